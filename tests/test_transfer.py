"""Transfer learning: per-variable learning rates, the logistic-regression probe, and a
run from an imported ImageNet file logging where its weights came from."""

from __future__ import annotations

import json

import keras
import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.test_weights import MOBILENET_V2, _pretrained
from thyroid_cad import settings
from training import ensemble, export, models, optim
from training.train import TrainConfig, train


def test_backbone_steps_at_its_own_learning_rate():
    """Adam's first step moves every weight by about lr (whatever the gradient's size),
    so the backbone's weights move by lr x factor and the head's by lr."""
    model = models.build_model("tiny", 2, 32)
    base, head = model.get_layer("backbone"), model.get_layer("cam_head")
    model.compile(
        optimizer=optim.TwoRateAdam(1e-2, 0.1, base.trainable_weights),
        loss=keras.losses.CategoricalCrossentropy(),
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 2, 8), 2)
    kernel = base.get_layer("block1_conv").kernel
    before = kernel.numpy(), head.kernel.numpy()
    model.train_on_batch(x, y)
    steps = np.abs(kernel.numpy() - before[0]), np.abs(head.kernel.numpy() - before[1])
    assert np.median(steps[0]) == pytest.approx(1e-3, rel=0.05)
    assert np.median(steps[1]) == pytest.approx(1e-2, rel=0.05)


def test_learning_rates_follow_the_start():
    scratch = TrainConfig(data="d", backbone="tiny")
    assert (scratch.head_lr, scratch.backbone_lr) == (1e-3, 1e-3)
    pretrained = TrainConfig(data="d", backbone="tiny", init_from="run", learning_rate=2e-3)
    assert pretrained.backbone_lr == pytest.approx(2e-4)
    assert TrainConfig(data="d", backbone_lr_factor=0.01).backbone_lr == pytest.approx(1e-5)
    assert TrainConfig(data="d", strategy="two-phase", epochs=9).warmup_epochs_ == 3


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"backbone_lr_factor": 2.0}, "factor must be in"),
        ({"strategy": "two-phase", "epochs": 4, "warmup_epochs": 4}, "warm-up epochs"),
        ({"classifier_c": 0.0}, "must be positive"),
    ],
)
def test_bad_transfer_options_are_refused(phantom_root, bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(data=str(phantom_root), **bad).validate()


def test_logistic_regression_on_pooled_features_exports(home, tiny_run, phantom_root, tmp_path):
    run_id = train(
        TrainConfig(
            data=str(phantom_root),
            backbone="tiny",
            strategy="frozen",
            classifier="logreg",
            classifier_c=0.1,
            init_from=tiny_run,
            epochs=1,
            image_size=64,
            experiment="tests",
        )
    )
    run = MlflowClient(settings.tracking_uri()).get_run(run_id)
    assert run.data.params["classifier_c"] == "0.1"
    assert run.data.metrics["test_auc"] > 0.85  # tiny_run's features separate the phantom
    # The probe is folded into the network's head: no scikit-learn file, a heatmap,
    # temperature scaling as for softmax, and the in-graph TTA of a softmax run.
    names = {a.path for a in MlflowClient(settings.tracking_uri()).list_artifacts(run_id, "model")}
    assert "model/classifier.pkl" not in names
    card = export.export_run(run_id, tmp_path / "plain")
    assert card["classifier"] == "logreg" and card["parity"]["passed"], card["parity"]
    assert card["heatmap"] and card["parity"]["heatmap_min_pearson"] >= 0.99
    assert card["calibration"]["method"] == "temperature scaling on validation"
    flips = ensemble.export_runs([run_id], tmp_path / "flips", tta="flips")
    assert flips["heatmap"] and flips["parity"]["passed"], flips["parity"]


@pytest.mark.shared_data
def test_run_from_an_imagenet_tflite_file_logs_its_provenance(home, phantom_root, tmp_path):
    path = _pretrained(MOBILENET_V2[0])
    run_id = train(
        TrainConfig(
            data=str(phantom_root),
            backbone="mobilenetv2",
            weights=str(path),
            strategy="two-phase",
            epochs=2,
            image_size=32,
            max_images=60,
            experiment="tests",
        )
    )
    run = MlflowClient(settings.tracking_uri()).get_run(run_id)
    assert run.data.params["weights_sha256"].startswith("5d3137241276e79c")
    assert run.data.params["weights_format"] == "tflite"
    assert float(run.data.params["lr_backbone"]) == pytest.approx(1e-4)
    assert run.data.metrics["weights_parity_pooled_cosine_min"] > 0.95
    info = json.loads(
        open(
            mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="model/info.json", tracking_uri=settings.tracking_uri()
            )
        ).read()
    )
    assert info["pretrained"]["weights"] == str(path)
    card = export.export_run(run_id, tmp_path)
    assert card["pretrained"]["weights_sha256"] == run.data.params["weights_sha256"]
    assert card["parity"]["passed"], json.dumps(card["parity"])


def test_mobilenetv2_run_exports_with_heatmap_and_ood(home, phantom_root, tmp_path):
    """Downstream of a new backbone (weights=None, 64 px: a 2x2 last feature map): the
    exported graph carries Grad-CAM of its last convolution and the OOD score, both
    checked against Keras."""
    run_id = train(
        TrainConfig(
            data=str(phantom_root),
            backbone="mobilenetv2",
            strategy="frozen",  # untrained features: one epoch from scratch
            # leaves MobileNetV2's slow (momentum 0.999) batch-norm statistics unsettled
            epochs=1,
            image_size=64,
            max_images=60,
            experiment="tests",
        )
    )
    card = export.export_run(run_id, tmp_path)
    assert card["backbone"] == "mobilenetv2" and card["pretrained"] is None
    assert card["heatmap"] is True and card["heatmap_shape"][1:] == [2, 2, 2]
    assert card["parity"]["passed"], json.dumps(card["parity"])
    assert card["ood"]["threshold"] > 0 and card["parity"]["ood_score_max_rel_diff"] < 1e-3


def test_frozen_features_are_cached_once_per_backbone_and_images(tmp_path, monkeypatch):
    from training import train as train_module

    home = tmp_path
    monkeypatch.setenv("THYROID_CAD_HOME", str(home))
    model = models.build_model("tiny", 2, 32)
    images = np.random.default_rng(3).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    rows = {"train": [0, 1, 2, 3], "test": [4, 5]}
    cfg = TrainConfig(data="d", strategy="frozen", classifier="logreg", seed=11)
    first = train_module._pooled_features(model, cfg, images, rows)
    assert first["train"].shape == (4, 96) and first["test"].shape == (2, 96)
    cache = sorted((home / "cache").glob("features-*.npy"))
    assert len(cache) == 1
    again = train_module._pooled_features(model, cfg, images, rows)
    np.testing.assert_array_equal(again["test"], first["test"])
    other = train_module._pooled_features(model, cfg, images[::-1].copy(), rows)
    assert not np.array_equal(other["test"], first["test"])  # other images: computed anew
    assert len(list((home / "cache").glob("features-*.npy"))) == 2
