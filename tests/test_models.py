"""Backbones, strategies and the class-activation head (weights=None, small inputs)."""

import numpy as np
import pytest
import tensorflow as tf

from training import models


@pytest.mark.parametrize("backbone", models.BACKBONES)
def test_every_weighted_backbone_layer_has_a_block(backbone):
    model = models.build_model(backbone, 2, 32 if backbone != "tiny" else 32)
    base = model.get_layer("backbone")
    orphans = [
        layer.name
        for layer in models._leaf_layers(base)
        if layer.trainable_weights and models.block_of(backbone, layer.name) is None
    ]
    assert orphans == []


@pytest.mark.parametrize(
    "backbone", ["tiny", "vgg16", "resnet50", "efficientnetb0", "mobilenetv2", "squeezenet"]
)
def test_strategies_open_the_right_layers(backbone):
    model = models.build_model(backbone, 3, 32)
    head = model.get_layer("cam_head")
    assert models.set_trainable(model, backbone, "frozen") == []
    assert {w.path for w in model.trainable_weights} == {w.path for w in head.trainable_weights}

    top = models.BLOCKS[backbone][-1]
    assert models.set_trainable(model, backbone, "partial", blocks=1) == [top]
    base = model.get_layer("backbone")
    opened = [layer for layer in models._leaf_layers(base) if layer.trainable and layer.weights]
    assert opened and all(models.block_of(backbone, layer.name) == top for layer in opened)
    assert not any(isinstance(layer, tf.keras.layers.BatchNormalization) for layer in opened)

    models.set_trainable(model, backbone, "full")
    all_weights = sum(len(layer.trainable_weights) for layer in models._leaf_layers(base))
    assert len(model.trainable_weights) == all_weights + 2


def test_partial_rejects_too_many_blocks():
    model = models.build_model("tiny", 2, 32)
    with pytest.raises(ValueError, match="cannot unfreeze 5"):
        models.set_trainable(model, "tiny", "partial", blocks=5)


def test_cam_equals_gradcam_from_gradient_tape():
    """The in-graph map is Grad-CAM exactly (up to the 1/(h*w) factor), per class."""
    model = models.build_model("tiny", 3, 48)
    rng = np.random.default_rng(0)
    head = model.get_layer("cam_head")
    head.kernel.assign(rng.normal(size=head.kernel.shape).astype("float32"))
    x = tf.constant(rng.uniform(0, 255, size=(2, 48, 48, 3)).astype("float32"))
    outputs = models.with_heatmaps(model)(x)
    cam = outputs["cam"].numpy()

    features_model = tf.keras.Model(model.inputs, head.input)
    for k in range(3):
        with tf.GradientTape() as tape:
            features = features_model(x)
            tape.watch(features)
            pooled = tf.reduce_mean(features, axis=(1, 2))
            logit = (pooled @ head.kernel + head.bias)[:, k]
        grads = tape.gradient(logit, features)
        alpha = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        gradcam = tf.nn.relu(tf.reduce_sum(alpha * features, axis=-1)).numpy()
        h, w = cam.shape[1:3]
        np.testing.assert_allclose(
            np.maximum(cam[..., k], 0) / (h * w), gradcam, rtol=1e-4, atol=1e-6
        )


def test_probabilities_follow_temperature_and_sum_to_one():
    model = models.build_model("tiny", 2, 32)
    x = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    head = model.get_layer("cam_head")
    head.kernel.assign(head.kernel * 50)
    p1 = model.predict(x, verbose=0)
    head.temperature.assign(4.0)
    p4 = model.predict(x, verbose=0)
    np.testing.assert_allclose(p4.sum(axis=1), 1, atol=1e-6)
    assert np.all(np.abs(p4 - 0.5) <= np.abs(p1 - 0.5) + 1e-7)  # softer, never sharper


@pytest.mark.parametrize("k", [2, 3])
def test_a_folded_logistic_probe_is_the_head(k):
    """fold_linear_probe: the network's own softmax gives the probe's probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = models.build_model("tiny", k, 32)
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, (60, 32, 32, 3)).astype("float32")
    x[:, :8] *= np.repeat(np.arange(60) % k, 1)[:, None, None, None] / k  # some signal
    y = np.arange(60) % k
    feats = models.feature_extractor(model).predict(x, verbose=0)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000))
    probe.fit(feats, y)
    head = model.get_layer("cam_head")
    head.temperature.assign(3.0)  # folding resets it: the probe's own probabilities
    models.fold_linear_probe(model, probe)
    np.testing.assert_allclose(model.predict(x, verbose=0), probe.predict_proba(feats), atol=1e-5)
    assert float(head.temperature.numpy()) == 1.0

    two = make_pipeline(StandardScaler(), LogisticRegression()).fit(feats, y % 2)
    if k != 2:  # a probe of other classes than the head's is refused
        with pytest.raises(ValueError, match="classes"):
            models.fold_linear_probe(model, two)


def test_save_load_roundtrip_keeps_heads_and_temperature(tmp_path):
    model = models.build_model("tiny", 2, 32)
    model.get_layer("cam_head").temperature.assign(0.7)
    model.save(tmp_path / "m.keras")
    loaded = models.load(tmp_path / "m.keras")
    x = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    a, b = models.with_heatmaps(model)(x), models.with_heatmaps(loaded)(x)
    for key in ("probabilities", "cam"):
        np.testing.assert_allclose(a[key], b[key], atol=1e-6)
    assert float(loaded.get_layer("cam_head").temperature.numpy()) == pytest.approx(0.7)


def test_copy_backbone_transfers_weights_and_checks_shape():
    a, b = models.build_model("tiny", 2, 32), models.build_model("tiny", 3, 64)
    models.copy_backbone(a, b)
    for wa, wb in zip(
        a.get_layer("backbone").weights, b.get_layer("backbone").weights, strict=True
    ):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy())
    with pytest.raises(ValueError, match="does not match"):
        models.copy_backbone(models.build_model("vgg16", 2, 32), a)


def test_weights_argument_is_validated(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="existing file"):
        models.build_model("vgg16", 2, 32, weights=str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="no pretrained weights"):
        models.build_model("tiny", 2, 32, weights="imagenet")


def test_imagenet_offline_gives_a_clear_message(tmp_path, monkeypatch):
    """Keeps the real weights='imagenet' path; offline it must say what to do."""
    import keras

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")  # what get_file raises offline

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.applications.vgg16.file_utils.get_file", offline)
    with pytest.raises(ValueError, match="not in the Keras cache"):
        models.build_model("vgg16", 2, 32, weights="imagenet")


def test_local_weights_file_is_loaded(tmp_path):
    donor = models.build_backbone("vgg16", 32, None)
    inner = [layer for layer in donor.layers if isinstance(layer, tf.keras.Model)][0]
    path = tmp_path / "vgg16_notop.weights.h5"
    inner.save_weights(path)
    model = models.build_model("vgg16", 2, 32, weights=str(path))
    got = model.get_layer("backbone").get_weights()
    for a, b in zip(inner.get_weights(), got, strict=True):
        np.testing.assert_array_equal(a, b)
