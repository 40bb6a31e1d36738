"""ONNX export: one graph with probabilities and Grad-CAM, parity, model card."""

import json

import numpy as np
import onnxruntime as ort
import pytest

from thyroid_cad import imaging, settings
from thyroid_cad.files import sha256_file
from training import export, models, phantom


def _phantom_batch(n: int, size: int, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            imaging.prepare(phantom.make_image(phantom.CLASS_NAMES_2[i % 2], rng), size)
            for i in range(n)
        ]
    )


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_export_writes_graph_and_card(tiny_export):
    card = json.loads((tiny_export / "model_card.json").read_text())
    assert card["sha256"] == sha256_file(tiny_export / "model.onnx")
    assert card["class_names"] == ["benign", "malignant"] and card["input_size"] == 64
    assert card["heatmap"] is True and card["heatmap_shape"][1:] == [8, 8, 2]
    assert card["parity"]["passed"] is True
    assert card["parity"]["probabilities_max_abs_diff"] < 1e-4
    assert card["parity"]["heatmap_min_pearson"] >= 0.99
    assert "validation images of split" in card["parity"]["image_source"]
    assert "not for diagnostic use" in card["disclaimer"]
    assert 0 < card["threshold"] < 1 and card["calibration"]["temperature"] > 0
    assert card["metrics"]["test"]["auc_ci_low"] <= card["metrics"]["test"]["auc"]
    assert card["source_run_id"] and card["training_data_fingerprint"]
    # The run's source numbers, for the shortcut gate: one source, its AUC is the pooled one.
    robust = card["source_robustness"]
    assert robust["sources"]["256x256"]["auc"] == card["metrics"]["test"]["auc"]
    assert robust["robust_score"] == card["metrics"]["test"]["auc"]
    assert robust["shortcut_floor"]["auc"] == card["shortcut_auc"] == 0.5
    sess = _session(tiny_export / "model.onnx")
    (inp,) = sess.get_inputs()
    assert inp.name == "image" and inp.type == "tensor(uint8)" and inp.shape[1:] == [64, 64, 3]
    assert not isinstance(inp.shape[0], int)  # dynamic batch
    assert sorted(o.name for o in sess.get_outputs()) == ["heatmap", "ood_score", "probabilities"]
    assert card["ood"]["threshold"] > 0 and card["parity"]["ood_score_max_rel_diff"] < 1e-3


@pytest.mark.parametrize("batch", [1, 5])
def test_onnx_matches_keras_on_any_batch(home, tiny_run, tiny_export, batch):
    import mlflow

    model = models.load(
        mlflow.artifacts.download_artifacts(
            run_id=tiny_run, artifact_path="model/model.keras", tracking_uri=settings.tracking_uri()
        )
    )
    images = _phantom_batch(batch, 64)
    probs, heat = _session(tiny_export / "model.onnx").run(
        ["probabilities", "heatmap"], {"image": images}
    )
    keras_out = models.with_heatmaps(model)(images.astype("float32"))
    np.testing.assert_allclose(probs, keras_out["probabilities"], atol=1e-4)
    h, w = heat.shape[1:3]
    expected = np.maximum(np.asarray(keras_out["cam"]), 0) / (h * w)
    np.testing.assert_allclose(heat, expected, rtol=1e-3, atol=1e-5)
    corr = export.heatmap_correlations(heat, export.keras_gradcam(model, images), 64)
    assert min(corr) >= 0.99


def test_heatmap_parity_on_real_ultrasound(home, tiny_run, thyroid_seed, tmp_path):
    import mlflow

    model = models.load(
        mlflow.artifacts.download_artifacts(
            run_id=tiny_run, artifact_path="model/model.keras", tracking_uri=settings.tracking_uri()
        )
    )
    paths = sorted((thyroid_seed / "test" / "malin").glob("*.jpg"))[:6]
    paths += sorted((thyroid_seed / "test" / "benin").glob("*.jpg"))[:6]
    images = np.stack([imaging.load_prepared(p, 64) for p in paths])
    info = {"class_names": ["benign", "malignant"], "image_size": 64, "threshold": 0.5}
    card = export.export_model(model, info, tmp_path, images, "12 thyroid-seed test images")
    assert card["parity"]["passed"], card["parity"]
    assert card["parity"]["heatmap_min_pearson"] >= 0.99


@pytest.mark.parametrize(
    "backbone", ["vgg16", "vgg19", "resnet50", "efficientnetb0", "mobilenetv2", "squeezenet"]
)
def test_every_backbone_exports_with_parity(backbone, tmp_path):
    model = models.build_model(backbone, 3, 32)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    info = {
        "class_names": ["normal", "benign", "malignant"],
        "image_size": 32,
        "threshold": 0.3,
        "backbone": backbone,
        "classifier": "softmax",
    }
    card = export.export_model(model, info, tmp_path, images, "random pixels")
    assert card["parity"]["probabilities_max_abs_diff"] < 1e-4, card["parity"]
    assert card["parity"]["heatmap_min_pearson"] >= 0.99, card["parity"]
    out = _session(tmp_path / "model.onnx").run(["probabilities", "heatmap"], {"image": images})
    assert out[0].shape == (4, 3) and out[1].shape[0] == 4 and out[1].shape[-1] == 3


@pytest.mark.parametrize("classifier", ["rf", "svm"])
def test_feature_classifier_exports_one_graph_without_heatmap(
    home, tiny_run, phantom_root, tmp_path, classifier
):
    from training.train import TrainConfig, train

    run_id = train(
        TrainConfig(
            data=str(phantom_root),
            backbone="tiny",
            strategy="frozen",
            classifier=classifier,
            init_from=tiny_run,
            epochs=1,
            image_size=64,
            experiment="tests",
        )
    )
    card = export.export_run(run_id, tmp_path)
    assert card["heatmap"] is False and classifier in card["heatmap_note"]
    assert card["parity"]["passed"], card["parity"]
    sess = _session(tmp_path / "model.onnx")
    assert sorted(o.name for o in sess.get_outputs()) == ["ood_score", "probabilities"]
    assert card["ood"]["threshold"] > 0 and card["ood"]["validation"]["n"] > 0
    (probs,) = sess.run(["probabilities"], {"image": _phantom_batch(6, 64)})
    assert probs.shape == (6, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_export_follows_a_progressive_parent(home, tiny_run):
    import mlflow

    from training import tracking

    tracking.setup("tests")
    with mlflow.start_run(tags={"thyroid_run": tiny_run}) as parent:
        pass
    assert export.model_run(parent.info.run_id) == tiny_run


def test_export_of_unknown_run_is_a_clear_error(home, tmp_path):
    from training import tracking

    tracking.setup_uri()
    with pytest.raises(ValueError, match="no MLflow run"):
        export.export_run("0" * 32, tmp_path)
