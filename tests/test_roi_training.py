"""Localiser and ROI training on the phantom: train, log, export, bundle, register."""

import inspect
import json
import shutil
import subprocess
import sys

import mlflow
import numpy as np
import onnxruntime as ort
import pytest
from mlflow.tracking import MlflowClient
from test_train import _cfg as train_cfg

from thyroid_cad import imaging, settings
from thyroid_cad.files import sha256_file
from training import annotations, export, localiser, roi
from training.data import DataError, scan
from training.train import TrainConfig, train


@pytest.fixture(scope="module")
def localiser_run(phantom_localiser) -> str:
    return phantom_localiser


def _cfg(data, **kw) -> TrainConfig:
    """test_train's small phantom configuration, shorter."""
    return train_cfg(data, **{"epochs": 2, "max_images": 100, "experiment": "tests-roi", **kw})


def _artifact(run_id, path):
    return mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=path, tracking_uri=settings.tracking_uri()
    )


# --------------------------------------------------------------------------- #
# localiser
# --------------------------------------------------------------------------- #
def test_localiser_learns_the_phantom_outlines(home, localiser_run, phantom_root):
    client = MlflowClient(settings.tracking_uri())
    run = client.get_run(localiser_run)
    m, p = run.data.metrics, run.data.params
    assert m["test_dice"] > 0.5 and m["test_iou"] > 0.35, m
    assert m["test_box_iou"] > 0.4 and 0 <= m["test_box_hit"] <= 1
    assert m["test_dice_data"] == m["test_dice"]  # one source, named after its folder
    assert p["image_size"] == "64" and p["filters"] == "8,16,32,48" and p["sources"] == "data"
    assert run.data.tags["kind"] == "localiser"
    assert len(client.get_metric_history(localiser_run, "epoch_val_loss")) >= 2
    paths = {a.path for a in client.list_artifacts(localiser_run)}
    assert {"split.json", "plots", "model", "localiser"} <= paths
    split = json.load(open(_artifact(localiser_run, "split.json")))
    case_of = {
        f"data/{a.rel}": a.case_id
        for a in annotations.read_annotations(phantom_root / "annotations.csv").values()
    }
    sides = {}  # grouped: the images of one phantom case sit on one side
    for rel, side in split["assignment"].items():
        sides.setdefault(case_of[rel], set()).add(side)
    assert len(split["assignment"]) == 160 and all(len(s) == 1 for s in sides.values())


def test_localiser_export_is_onnx_with_a_card(home, localiser_run, tmp_path):
    card = localiser.export_run(localiser_run, tmp_path)
    onnx_path = tmp_path / "localiser.onnx"
    assert card["sha256"] == sha256_file(onnx_path) and card["kind"] == "localiser"
    assert card["parity"]["passed"] and card["parity"]["mask_max_abs_diff"] < 1e-4
    assert card["source_run_id"] == localiser_run and card["input_size"] == 64
    assert card["metrics"]["test"]["dice"] > 0.5 and "not for diagnostic use" in card["disclaimer"]
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert inp.name == "image" and inp.type == "tensor(uint8)" and inp.shape[1:] == [64, 64, 3]
    assert out.name == "mask" and out.shape[1:] == [64, 64] and not isinstance(out.shape[0], int)
    images = np.zeros((3, 64, 64, 3), np.uint8)
    (mask,) = sess.run(None, {"image": images})
    assert mask.shape == (3, 64, 64) and 0 <= mask.min() and mask.max() <= 1


def test_localiser_proposals_find_the_nodules(home, localiser_run, phantom_root):
    bundle = roi.resolve_localiser(localiser_run)
    dataset = scan(phantom_root)
    picked = list(range(0, len(dataset.records), 40))
    boxes = roi.propose_all(
        [dataset.records[i].path for i in picked],
        [dataset.sha256()[i] for i in picked],
        bundle,
    )
    truth = annotations.for_dataset(dataset)
    ious = [localiser.box_iou(b, truth[i].roi()) for i, b in zip(picked, boxes, strict=True)]
    assert np.mean(ious) > 0.4, ious
    # cached: the same answer without running the model again
    again = roi.propose_all(
        [dataset.records[i].path for i in picked],
        [dataset.sha256()[i] for i in picked],
        bundle,
    )
    assert again == boxes


def test_localiser_cli_train_and_export(phantom_root, session_home, tmp_path):
    env = {"THYROID_CAD_HOME": str(session_home), "PATH": "/usr/bin:/bin"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "cli", "localiser", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )

    result = cli(
        "train",
        "--data",
        str(phantom_root),
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--filters",
        "4,8,16",
        "--max-images",
        "60",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run_id = result.stdout.strip().splitlines()[-1]
    result = cli("export", run_id, "--out", str(tmp_path / "loc"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(tmp_path / "loc" / "localiser.onnx")
    for args, message in [
        (["train", "--data", str(tmp_path)], "none of annotations.csv"),
        (["train"], "give --data or --annotations"),
        (["export", "0" * 32, "--out", str(tmp_path / "x")], "no exported localiser"),
    ]:
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"annotations": []}, "at least one annotation file"),
        ({"image_size": 100}, "divisible by 16"),
        ({"filters": (8,)}, "at least two"),
        ({"epochs": 0}, "epochs"),
        ({"threshold": 1.0}, "threshold"),
    ],
)
def test_localiser_configuration_is_checked(kwargs, message):
    cfg = localiser.LocaliserConfig(**{"annotations": ["a.csv"], **kwargs})
    with pytest.raises(ValueError, match=message):
        cfg.validate()


# --------------------------------------------------------------------------- #
# the classifier on ROI crops
# --------------------------------------------------------------------------- #
def test_classifier_trains_on_annotated_rois(home, phantom_root):
    run_id = train(_cfg(phantom_root, roi="annotations", roi_margin=0.5, roi_jitter=0.1))
    run = MlflowClient(settings.tracking_uri()).get_run(run_id)
    p, m = run.data.params, run.data.metrics
    assert (p["roi"], p["roi_margin"], p["roi_jitter"]) == ("annotations", "0.5", "0.1")
    n_used = int(p["n_train"]) + int(p["n_val"]) + int(p["n_test"])
    assert m["roi_from_annotation"] == n_used and m["roi_from_localiser"] == 0
    table = json.load(open(_artifact(run_id, "rois.json")))
    assert table["margin"] == 0.5 and len(table["rois"]) == n_used
    split = json.load(open(_artifact(run_id, "split.json")))
    truth = {a.rel: a.roi() for a in annotations.for_dataset(scan(phantom_root)) if a}
    moved = 0
    for rel, entry in table["rois"].items():
        assert entry["source"] == "annotation"
        if split["assignment"][rel] == "train":  # jittered
            moved += tuple(entry["box"]) != truth[rel]
        else:
            assert tuple(entry["box"]) == truth[rel]
    assert moved > 0.5 * int(p["n_train"])
    info = json.load(open(_artifact(run_id, "model/info.json")))
    assert info["roi"]["mode"] == "annotations" and info["roi"]["localiser"] is None


def test_classifier_with_localiser_bundles_it_through_export_and_registry(
    home, phantom_root, localiser_run, tmp_path
):
    from registry import store

    run_id = train(_cfg(phantom_root, roi="localiser", localiser=localiser_run, roi_margin=0.4))
    m = MlflowClient(settings.tracking_uri()).get_run(run_id).data.metrics
    assert m["roi_from_localiser"] + m["roi_from_none"] > 0 and m["roi_from_annotation"] == 0
    out = tmp_path / "export"
    card = export.export_run(run_id, out)
    loc_sha = sha256_file(out / "localiser.onnx")
    assert card["roi"]["margin"] == 0.4 and card["roi"]["mode"] == "localiser"
    assert card["roi"]["localiser"]["sha256"] == loc_sha
    assert card["roi"]["localiser"]["source_run_id"] == localiser_run
    assert card["bundle"] == {
        "localiser.onnx": loc_sha,
        "localiser_card.json": sha256_file(out / "localiser_card.json"),
    }
    assert card["parity"]["passed"] and "validation images" in card["parity"]["image_source"]
    assert "ROI" in card["preprocessing"]

    # parity ran on the ROI crops training made, through the same function
    params = MlflowClient(settings.tracking_uri()).get_run(run_id).data.params
    rois_path = _artifact(run_id, "rois.json")
    images, _ = export._parity_images(
        {**params, "_split_path": _artifact(run_id, "split.json"), "_rois_path": rois_path}, 64
    )
    table = json.load(open(rois_path))
    split = json.load(open(_artifact(run_id, "split.json")))
    first = sorted(r for r, s in split["assignment"].items() if s == "val")[0]
    box = table["rois"][first]["box"]
    expected = imaging.load_prepared(phantom_root / first, 64, tuple(box) if box else None, 0.4)
    assert np.array_equal(images[0], expected)

    # the registry carries the exact localiser with the version
    name = f"roi-{run_id[:8]}"
    version = store.register(out, name)
    resolved = store.resolve(f"{name}/{version}", tmp_path / "resolved")
    for f in ("localiser.onnx", "localiser_card.json"):
        assert sha256_file(resolved.directory / f) == card["bundle"][f]
        assert sha256_file(tmp_path / "resolved" / f) == card["bundle"][f]
    assert store.cached(f"{name}/{version}").card["roi"]["localiser"]["sha256"] == loc_sha
    shutil.rmtree(resolved.directory)  # a fresh download brings it back too
    assert sha256_file(store.resolve(f"{name}/{version}").directory / "localiser.onnx") == loc_sha
    # A 2-epoch model may or may not clear the shortcut gate (seen: test AUC 0.29 in one
    # CI run); this test is about the bundle, tests/test_registry.py about the gate.
    store.promote(version, "champion", name, force=True, reason="2-epoch bundle test model")
    by_alias = store.resolve(f"{name}@champion")
    assert by_alias.name == name and (by_alias.directory / "localiser.onnx").is_file()
    assert store.cached(f"{name}@champion").card["bundle"] == card["bundle"]

    tampered = tmp_path / "tampered"
    shutil.copytree(out, tampered)
    (tampered / "localiser.onnx").write_bytes(b"not the localiser")
    with pytest.raises(store.RegistryError, match="localiser.onnx"):
        store.register(tampered, name)
    (tampered / "localiser.onnx").unlink()
    with pytest.raises(store.RegistryError, match="lacks localiser.onnx"):
        store.register(tampered, name)


def test_a_model_trained_on_annotations_does_not_flag_its_own_images(
    home, phantom_root, localiser_run, tmp_path
):
    """Served with the annotated box or without one (the localiser's box), a model trained
    on annotated crops flags about 5 % of its own test images as out of distribution.

    Its OOD reference and threshold see both crops (ood.reference_for_run with the
    bundled localiser); fitted on annotated crops alone, 28 of 40 demo frames sent
    without a box were flagged. Tolerance: the rate on the test images around a threshold
    estimated on the validation images has a standard deviation of about
    sqrt(0.05 * 0.95 * (1 / n_test + 1 / n_val)) (binomial count plus the quantile's own
    sampling error), where n counts cases, not frames: the 1-3 frames of a phantom case
    are near duplicates and are flagged together. 3 of those above 5 % keeps a chance
    failure below 1 in 700 (bound 22 % for 30 test and 30 validation cases). Measured on
    this 3-epoch model: 0 % with the annotated box, 13 % without; with the reference of
    annotated crops alone, 7 % and 27 % (fails).
    """
    from conftest import make_served
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    run_id = train(
        _cfg(
            phantom_root,
            roi="annotations",
            localiser=localiser_run,
            roi_margin=0.4,
            epochs=3,
            max_images=400,
        )
    )
    card = export.export_run(run_id, tmp_path / "export")
    split = json.load(open(_artifact(run_id, "split.json")))
    table = json.load(open(_artifact(run_id, "rois.json")))
    where = split["assignment"]
    sides = {s: sorted(r for r, a in where.items() if a == s) for s in ("val", "test")}
    # the threshold was set on both crops of every annotated validation image
    assert all(table["rois"][r]["source"] == "annotation" for r in sides["val"])
    assert card["ood"]["validation"]["n"] == 2 * len(sides["val"])

    served = make_served(tmp_path / "export", tmp_path, "roi-ood", force="3-epoch OOD test")
    flagged = {"annotation": 0, "localiser": 0}
    with TestClient(create_app(served.settings)) as client:
        for rel in sides["test"]:
            for source, params in (
                ("annotation", {"roi": ",".join(map(str, table["rois"][rel]["box"]))}),
                ("localiser", {}),
            ):
                r = client.post(
                    "/v1/predict",
                    params={"heatmap": "none", **params},
                    files={"file": ("x.png", (phantom_root / rel).read_bytes(), "image/png")},
                    headers={"Authorization": f"Bearer {served.predict_key}"},
                )
                assert r.status_code == 200, r.text
                flagged[source] += r.json()["ood"]["in_distribution"] is False
    case_of = {r.rel: r.case_id for r in scan(phantom_root).records}
    test_cases, val_cases = ({case_of[r] for r in sides[s]} for s in ("test", "val"))
    bound = 0.05 + 3 * np.sqrt(0.05 * 0.95 * (1 / len(test_cases) + 1 / len(val_cases)))
    n = len(sides["test"])
    rates = {source: count / n for source, count in flagged.items()}
    assert all(rate <= bound for rate in rates.values()), (rates, bound, n, len(test_cases))


def test_unet_backbone_starts_from_the_localiser_and_exports(
    home, phantom_root, localiser_run, tmp_path
):
    """The localiser's encoder as the classifier's backbone: its exported folder is the
    weights (its Keras model rides along), the encoder's weights arrive intact, and the
    frozen run trains, exports and answers by name."""
    from training import models

    folder = tmp_path / "localiser"
    localiser.export_run(localiser_run, folder)
    assert (folder / models.UNET_WEIGHTS_FILE).is_file()
    trained = models.load(folder / models.UNET_WEIGHTS_FILE)
    model = models.build_model("unet", 2, 48, weights=str(folder))
    base = model.get_layer("backbone")
    for name in ("down0_conv1", "bottleneck_conv1"):
        for got, want in zip(
            base.get_layer(name).get_weights(), trained.get_layer(name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(got, want)
    assert not any(layer.name.startswith("up") for layer in base.layers)
    with pytest.raises(ValueError, match="not a nodule localiser"):
        other = tmp_path / "tiny.keras"
        models.build_model("tiny", 2, 32).save(other)
        models.build_model("unet", 2, 32, weights=str(other))

    run_id = train(
        _cfg(
            phantom_root,
            backbone="unet",
            weights=str(folder),
            strategy="frozen",
            roi="localiser",
            localiser=str(folder),
        )
    )
    out = tmp_path / "export"
    card = export.export_run(run_id, out)
    assert card["backbone"] == "unet" and card["parity"]["passed"]
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {o.name for o in sess.get_outputs()}
    assert {"probabilities", "heatmap"} <= names
    (probs,) = sess.run(["probabilities"], {"image": np.zeros((2, 64, 64, 3), np.uint8)})
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_roi_configuration_is_checked_before_training(home, phantom_root, tmp_path):
    with pytest.raises(ValueError, match="unknown roi mode"):
        train(_cfg(phantom_root, roi="bbox"))
    with pytest.raises(ValueError, match="needs a localiser"):
        train(_cfg(phantom_root, roi="localiser"))
    with pytest.raises(ValueError, match="margin"):
        train(_cfg(phantom_root, roi="annotations", roi_margin=-0.1))
    with pytest.raises(ValueError, match="not a localiser folder|neither"):
        train(_cfg(phantom_root, roi="localiser", localiser=str(tmp_path / "nothing")))
    from training import phantom

    three = tmp_path / "three"  # normal frames have no outline, and no localiser is given
    phantom.generate(three, per_class=12, classes=3, seed=4, size=64)
    with pytest.raises(ValueError, match="have no annotated nodule box"):
        train(_cfg(three, roi="annotations", max_images=None))
    (three / "annotations.csv").unlink()
    with pytest.raises(DataError, match="no annotation file"):
        train(_cfg(three, roi="annotations", max_images=None))


def test_jitter_stays_inside_the_frame():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x, y, w, h = roi.jitter((5, 90, 40, 20), 0.3, (100, 120), rng)
        assert 0 <= x and 0 <= y and x + w <= 100 and y + h <= 120 and w >= 1 and h >= 1
        assert 40 * 0.69 <= w <= 40 * 1.31


def test_cli_roi_options(phantom_root, session_home):
    from cli.training import train as train_command

    default = inspect.signature(train_command).parameters["roi_margin"].default
    assert default == imaging.ROI_MARGIN
    env = {"THYROID_CAD_HOME": str(session_home), "PATH": "/usr/bin:/bin"}
    for args, message in [
        (["--roi", "bbox"], "bbox"),
        (["--roi", "localiser"], "needs a localiser"),
        (["--roi", "localiser", "--localiser", "/nonexistent"], "neither"),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "cli", "train", "--data", str(phantom_root), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- #
# real data
# --------------------------------------------------------------------------- #
@pytest.mark.shared_data
def test_localiser_trains_on_ddti_outlines_and_breast_us_masks(home, thyroid_seed):
    breast = thyroid_seed.parent / "breast-us"
    if not breast.is_dir():
        pytest.skip(f"real data not available: {breast} is absent")
    run_id = localiser.train_localiser(
        localiser.LocaliserConfig(
            annotations=[
                str(thyroid_seed / "ddti-annotations.csv"),
                str(breast / "annotations.csv"),
            ],
            image_size=64,
            filters=(4, 8, 16),
            epochs=1,
            max_images=120,
            experiment="tests-localiser",
        )
    )
    run = MlflowClient(settings.tracking_uri()).get_run(run_id)
    assert run.data.params["sources"] == "breast-us,thyroid-seed"
    m, p = run.data.metrics, run.data.params
    for key in ("test_dice_thyroid-seed", "test_dice_breast-us", "test_box_iou"):
        assert 0 <= m[key] <= 1, key
    assert int(p["n_train"]) + int(p["n_val"]) + int(p["n_test"]) <= 120
    assert m["test_n_thyroid-seed"] > 0 and m["test_n_breast-us"] > 0


# --------------------------------------------------------------------------- #
# the localiser on a pretrained MobileNetV2 encoder
# --------------------------------------------------------------------------- #
def _mobilenet_cfg(annotation_files, **kw) -> localiser.LocaliserConfig:
    return localiser.LocaliserConfig(
        annotations=[str(f) for f in annotation_files],
        image_size=64,
        encoder="mobilenetv2",
        filters=(4, 8, 8, 16, 16),
        experiment="tests-localiser",
        **{"epochs": 2, "max_images": 48, **kw},
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"encoder": "resnet"}, "unknown encoder"),
        ({"weights": "x.tflite"}, "weights go with mobilenetv2"),
        ({"encoder": "mobilenetv2", "filters": (8, 16, 32, 64)}, "needs 5 up-path widths"),
        ({"encoder": "mobilenetv2", "filters": (8,) * 5, "image_size": 80}, "divisible by 32"),
    ],
)
def test_encoder_choice_is_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        localiser.LocaliserConfig(**{"annotations": ["a.csv"], **kwargs}).validate()


def _epochs(ds, n=2):
    return [[(x.numpy(), y.numpy()) for x, y in ds] for _ in range(n)]


def test_augmentation_is_the_same_every_run_and_new_every_epoch():
    """Stateless draws per batch: tf.data's parallel calls cannot reorder them (the
    phantom fixture's result used to vary with thread timing), yet epochs differ."""
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 255, (24, 32, 32, 4)).astype(np.uint8)
    arrays[..., 3] = arrays[..., 3] > 128
    first, again = (
        _epochs(localiser.make_dataset(arrays, 8, True, True, seed=3)) for _ in range(2)
    )
    for a, b in zip(first, again, strict=True):
        assert all(
            np.array_equal(x1, x2) and np.array_equal(y1, y2)
            for (x1, y1), (x2, y2) in zip(a, b, strict=True)
        )
    assert not np.array_equal(first[0][0][0], first[1][0][0])  # a new shuffle and new draws
    other = _epochs(localiser.make_dataset(arrays, 8, True, True, seed=4), 1)
    assert not np.array_equal(first[0][0][0], other[0][0][0])


@pytest.mark.parametrize("encoder", ["unet", "mobilenetv2"])
def test_the_mask_head_starts_at_the_foreground_prior(encoder, phantom_root):
    from training.unet import FOREGROUND_PRIOR

    if encoder == "unet":
        cfg = localiser.LocaliserConfig(annotations=["a.csv"], image_size=64, filters=(4, 8))
    else:
        cfg = _mobilenet_cfg([phantom_root / "annotations.csv"])
    model = localiser.build_localiser(cfg)
    x = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3)).astype("float32")
    mean = float(np.mean(model.predict(x, verbose=0)))
    assert abs(mean - FOREGROUND_PRIOR) < 0.05, mean  # not 0.5: see training.unet


def test_mobilenetv2_encoder_stays_frozen_while_the_up_path_learns(phantom_root):
    model = localiser.build_localiser(_mobilenet_cfg([phantom_root / "annotations.csv"]))
    encoder = model.get_layer("encoder")
    assert not encoder.trainable and encoder.trainable_weights == []
    assert model.trainable_weights and all(
        not any(w is e for e in encoder.weights) for w in model.trainable_weights
    )
    before = [np.array(w) for w in encoder.weights]  # kernels and BN moving statistics
    up = [np.array(w) for w in model.trainable_weights]
    model.compile(optimizer="adam", loss=localiser.dice_bce_loss)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (8, 64, 64, 3)).astype("float32")
    y = (rng.random((8, 64, 64)) > 0.7).astype("float32")
    model.fit(x, y, epochs=2, batch_size=4, verbose=0)
    assert all(np.array_equal(b, np.array(w)) for b, w in zip(before, encoder.weights, strict=True))
    assert any(
        not np.allclose(b, np.array(w)) for b, w in zip(up, model.trainable_weights, strict=True)
    )


def test_mobilenetv2_localiser_trains_exports_and_is_refused_as_a_unet_backbone(
    home, phantom_root, tmp_path
):
    from training import models

    run_id = localiser.train_localiser(_mobilenet_cfg([phantom_root / "annotations.csv"]))
    run = MlflowClient(settings.tracking_uri()).get_run(run_id)
    assert run.data.params["encoder"] == "mobilenetv2" and run.data.params["weights"] == "none"
    assert run.info.run_name == "localiser-mobilenetv264"
    card = localiser.export_run(run_id, tmp_path)
    assert card["architecture"]["encoder"] == "mobilenetv2" and "pretrained" not in card
    assert card["architecture"]["name"] == "U-Net, MobileNetV2 encoder"
    assert card["parity"]["passed"], card["parity"]
    sess = ort.InferenceSession(
        str(tmp_path / "localiser.onnx"), providers=["CPUExecutionProvider"]
    )
    (mask,) = sess.run(None, {"image": np.full((2, 64, 64, 3), 90, np.uint8)})
    assert mask.shape == (2, 64, 64) and 0 <= mask.min() and mask.max() <= 1
    with pytest.raises(ValueError, match="pretrained MobileNetV2"):
        models.unet_backbone(64, str(tmp_path / "localiser.keras"))


@pytest.mark.shared_data
def test_mobilenetv2_localiser_logs_its_imagenet_weights(home, thyroid_seed, tmp_path):
    from tests.test_weights import MOBILENET_V2, _pretrained

    weights = _pretrained(MOBILENET_V2[0])
    run_id = localiser.train_localiser(
        _mobilenet_cfg([thyroid_seed / "ddti-annotations.csv"], weights=str(weights), epochs=1)
    )
    card = localiser.export_run(run_id, tmp_path)
    pretrained = card["pretrained"]
    assert pretrained["weights_sha256"] == sha256_file(weights)
    assert pretrained["weights_format"] == "tflite"
    # 64 px frames resized up to the file's 224 px: further from its calibration than
    # test_weights' 224 px frames (measured 0.96 here, 0.985 there)
    assert pretrained["parity"]["weights_parity_pooled_cosine_min"] > 0.9, pretrained
    run = MlflowClient(settings.tracking_uri()).get_run(run_id)
    params, metrics = run.data.params, run.data.metrics
    assert metrics["weights_parity_pooled_cosine_min"] == pytest.approx(
        pretrained["parity"]["weights_parity_pooled_cosine_min"]
    )
    assert params["weights"] == str(weights) and params["weights_source"] == "file"
