"""TI-RADS descriptor heads end to end on the phantom: masked targets that keep the class
weights, a multi-task run with per-descriptor accuracy against the majority floor, the
exported `descriptor_<name>` outputs with parity, and /v1 and /v2 answers."""

from __future__ import annotations

import io
import json

import mlflow
import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient
from PIL import Image

from service.api.app import create_app
from thyroid_cad import imaging, settings, tirads
from training import annotations, descriptors, phantom, pipeline
from training.data import scan
from training.train import TrainConfig, train

DESCRIPTOR_OUTPUTS = {f"descriptor_{d}" for d in tirads.DESCRIPTORS}


@pytest.fixture(scope="module")
def small_phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("desc") / "data"
    phantom.generate(root, per_class=24, classes=2, seed=4, size=96)
    return root


def _cfg(root, **kw) -> TrainConfig:
    base = dict(
        data=str(root),
        backbone="tiny",
        epochs=2,
        image_size=48,
        batch_size=16,
        experiment="tests-descriptors",
        descriptors=True,
        class_weights="source",
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def descriptor_run(session_home, small_phantom):
    from conftest import _isolate

    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, session_home)
        return train(_cfg(small_phantom))


@pytest.fixture(scope="module")
def descriptor_export(session_home, descriptor_run, tmp_path_factory):
    from conftest import _isolate

    from training import export, tracking

    out = tmp_path_factory.mktemp("desc-export") / "m"
    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, session_home)
        tracking.setup_uri()
        export.export_run(descriptor_run, out)
    return out


def test_phantom_annotations_carry_ddti_descriptors(small_phantom):
    table = annotations.read_annotations(small_phantom / phantom.ANNOTATIONS)
    values = {a.rel: tirads.from_row(a.row) for a in table.values()}
    assert all(v["composition"] is not None for v in values.values())  # every nodule
    malignant = [v for rel, v in values.items() if rel.startswith("malignant/")]
    assert {v["echogenicity"] for v in malignant} == {"very hypoechoic"}
    assert {v["margin"] for v in malignant} == {"lobulated or irregular"}
    cysts = [v for v in values.values() if v["composition"].startswith("cystic")]
    assert cysts and all(v["echogenicity"] is None for v in cysts)  # left out, as in DDTI


def test_codes_mark_missing_descriptors(small_phantom):
    codes = descriptors.codes(scan(small_phantom))
    assert set(codes) == set(tirads.DESCRIPTORS)
    assert (codes["composition"] != descriptors.MISSING).all()
    assert (codes["echogenicity"] == descriptors.MISSING).any()
    onehot = descriptors.one_hot(codes)
    missing = codes["echogenicity"] == descriptors.MISSING
    assert onehot["descriptor_echogenicity"][missing].sum() == 0
    assert (onehot["descriptor_echogenicity"][~missing].sum(axis=1) == 1).all()


def test_descriptors_need_an_annotation_file(tmp_path):
    root = tmp_path / "plain"
    phantom.generate(root, per_class=3, classes=2, seed=1, size=48)
    (root / phantom.ANNOTATIONS).unlink()
    with pytest.raises(ValueError, match="needs TI-RADS descriptors"):
        descriptors.codes(scan(root))


def test_dataset_masks_missing_descriptors_and_keeps_class_weights():
    images = np.zeros((4, 8, 8, 3), np.uint8)
    weights = np.array([0.5, 2.0, 1.0, 3.0], np.float32)
    targets = descriptors.one_hot({d: np.array([0, -1, 1, -1]) for d in ("composition", "margin")})
    ds = pipeline.make_dataset(
        images, np.array([0, 1, 0, 1]), 2, batch_size=4, weights=weights, extra_targets=targets
    )
    _, y, w = next(iter(ds))
    assert set(y) == set(w) == {"probabilities", "descriptor_composition", "descriptor_margin"}
    np.testing.assert_array_equal(w["probabilities"].numpy(), weights)  # class weights kept
    np.testing.assert_array_equal(w["descriptor_margin"].numpy(), [1, 0, 1, 0])  # the mask
    np.testing.assert_array_equal(
        y["descriptor_composition"].numpy()[:, :2], [[1, 0], [0, 0], [0, 1], [0, 0]]
    )
    # Without weights (validation), the classifier's weight is 1 everywhere.
    _, _, w = next(iter(pipeline.make_dataset(images, np.zeros(4, int), 2, extra_targets=targets)))
    np.testing.assert_array_equal(w["probabilities"].numpy(), np.ones(4))


def test_run_logs_descriptor_accuracy_and_majority_floor(home, descriptor_run):
    client = MlflowClient(settings.tracking_uri())
    run = client.get_run(descriptor_run)
    m = run.data.metrics
    for d in tirads.DESCRIPTORS:
        key = f"test_descriptor_{d}"
        assert 0 <= m[f"{key}_accuracy_ci_low"] <= m[f"{key}_accuracy"]
        assert m[f"{key}_accuracy"] <= m[f"{key}_accuracy_ci_high"] <= 1
        assert 0 < m[f"{key}_majority"] <= 1 and m[f"{key}_n"] >= 1
    assert "epoch_descriptor_margin_loss" in m and "epoch_probabilities_auc" in m
    assert run.data.params["descriptors"] == "True"
    table = mlflow.artifacts.load_dict(f"runs:/{descriptor_run}/descriptors.json")
    assert table["margin"]["categories"] == tirads.categories("margin")
    assert table["echogenicity"]["train_missing"] > 0
    info = mlflow.artifacts.load_dict(f"runs:/{descriptor_run}/model/info.json")
    assert info["descriptors"] == descriptors.labels()


def test_feature_classifiers_ignore_descriptors_and_say_so(home, small_phantom):
    run_id = train(_cfg(small_phantom, classifier="svm", strategy="frozen", epochs=0))
    run = MlflowClient(settings.tracking_uri()).get_run(run_id)
    assert "ignored" in run.data.tags["descriptors_note"]
    assert not [k for k in run.data.metrics if "descriptor" in k]


def test_export_has_named_descriptor_outputs_with_parity(descriptor_export):
    card = json.loads((descriptor_export / "model_card.json").read_text())
    assert card["descriptors"] == descriptors.labels()
    assert DESCRIPTOR_OUTPUTS <= set(card["outputs"])
    assert card["parity"]["passed"]
    assert max(card["parity"]["descriptors_max_abs_diff"].values()) < 1e-4
    sess = ort.InferenceSession(
        str(descriptor_export / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in sess.get_outputs()]
    # the descriptor heads sit beside the OOD score (issue 12), all named
    assert "ood" in card
    assert set(names) == {"probabilities", "heatmap", "ood_score", *DESCRIPTOR_OUTPUTS}
    out = dict(
        zip(names, sess.run(None, {"image": np.zeros((2, 48, 48, 3), np.uint8)}), strict=True)
    )
    for d, labels in card["descriptors"].items():
        p = out[f"descriptor_{d}"]
        assert p.shape == (2, len(labels))
        np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-5)


@pytest.fixture(scope="module")
def desc_client(session_home, descriptor_export, tmp_path_factory):
    from conftest import _isolate, make_served

    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, session_home)
        served = make_served(
            descriptor_export,
            tmp_path_factory.mktemp("desc-srv"),
            "desc",
            force="a few-epoch phantom model with descriptor heads: the gate is tested elsewhere",
        )
        with TestClient(create_app(served.settings)) as client:
            yield served, client


def _png(label: str, seed: int) -> tuple[bytes, np.ndarray]:
    rgb = phantom.make_image(label, np.random.default_rng(seed), 96)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue(), rgb


def test_v1_predict_returns_descriptors_and_tirads_estimate(desc_client, descriptor_export):
    served, client = desc_client
    data, rgb = _png("malignant", 3)
    r = client.post(
        "/v1/predict",
        files={"file": ("x.png", data, "image/png")},
        headers={"Authorization": f"Bearer {served.predict_key}"},
    )
    assert r.status_code == 200, r.text
    pred = r.json()["prediction"]
    sess = ort.InferenceSession(
        str(descriptor_export / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    square = imaging.prepare(rgb, 48)[None]
    got = {o: sess.run([o], {"image": square})[0][0] for o in DESCRIPTOR_OUTPUTS}
    by_name = {d["descriptor"]: d for d in pred["descriptors"]}
    assert set(by_name) == set(tirads.DESCRIPTORS)
    for d, entry in by_name.items():
        probs = got[f"descriptor_{d}"]
        assert entry["value"] == tirads.categories(d)[int(np.argmax(probs))]
        assert entry["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
        assert entry["points"] == tirads.points_of(d, entry["value"])
    t = pred["tirads"]
    # no shape (no ROI); a spongiform estimate scores 0 whatever the rest (ACR's rule)
    spongiform = by_name["composition"]["value"] == "spongiform"
    assert t["points"] == (0 if spongiform else sum(e["points"] for e in pred["descriptors"]))
    assert t["level"] == tirads.level(t["points"]) and t["shape_points"] is None
    assert t["estimate"] is True and "not a radiologist" in t["note"]


def test_v2_returns_descriptor_tensors_by_name(desc_client):
    served, client = desc_client
    meta = client.get(f"/v2/models/{served.name}").json()
    assert DESCRIPTOR_OUTPUTS <= {o["name"] for o in meta["outputs"]}
    assert meta["parameters"]["descriptors"] == descriptors.labels()
    image = {"name": "image", "datatype": "UINT8", "shape": [1, 48, 48, 3], "data": [0] * 6912}
    body = {
        "inputs": [image],
        "outputs": [{"name": "descriptor_margin"}, {"name": "probabilities"}],
    }
    r = client.post(
        f"/v2/models/{served.name}/infer",
        json=body,
        headers={"Authorization": f"Bearer {served.predict_key}"},
    )
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert set(outputs) == {"descriptor_margin", "probabilities"}
    assert outputs["descriptor_margin"]["shape"] == [1, len(tirads.categories("margin"))]


def test_estimates_reach_the_structured_findings():
    from service.hospital import findings
    from service.inference import pipeline as inference
    from service.schemas import ModelOut

    card = {"class_names": ["benign", "malignant"], "threshold": 0.5, "descriptors": {}}
    card["descriptors"] = {"margin": tirads.categories("margin")}
    plain = inference.decide(card, np.array([0.3, 0.7]))
    shape = type("Shape", (), {"taller_than_wide": True})()
    pred = inference.with_descriptors(
        card, plain, {"descriptor_margin": np.array([0.1, 0.1, 0.7, 0.1])}, shape
    )
    assert pred.descriptors[0].value == "lobulated or irregular"
    assert (pred.tirads.points, pred.tirads.shape_points, pred.tirads.level) == (5, 3, "TR4")
    model = ModelOut(
        name="m", version=1, alias=None, source_run_id=None, onnx_sha256="0" * 64, provider="cpu"
    )
    found = findings.finding(model, pred, descriptors=pred.descriptors, tirads=pred.tirads)
    assert found.tirads_level == "TR4" and found.descriptors[0].points == 2
    # Models without heads: the prediction is left as it was.
    assert inference.with_descriptors({**card, "descriptors": {}}, plain, {}, None) is plain


def test_tta_averages_the_descriptor_heads_too(session_home, descriptor_run, tmp_path):
    from conftest import _isolate

    from training import ensemble, models

    with pytest.MonkeyPatch.context() as mp:
        _isolate(mp, session_home)
        card = ensemble.export_combined([descriptor_run], tmp_path, tta="flips")
        keras_model = models.load(
            mlflow.artifacts.download_artifacts(
                run_id=descriptor_run,
                artifact_path="model/model.keras",
                tracking_uri=settings.tracking_uri(),
            )
        )
    assert card["parity"]["passed"], card["parity"]
    assert card["descriptors"] == descriptors.labels()
    assert max(card["parity"]["descriptors_max_abs_diff"].values()) < 1e-4
    images = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(None, {"image": images}), strict=True))
    net = models.with_heatmaps(keras_model)
    plain, flipped = net(images.astype("float32")), net(images[:, :, ::-1].astype("float32"))
    for name in DESCRIPTOR_OUTPUTS:
        expected = (np.asarray(plain[name]) + np.asarray(flipped[name])) / 2
        np.testing.assert_allclose(got[name], expected, atol=1e-4)
