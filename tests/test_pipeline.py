"""The tf.data input pipeline: sample weights travel with their images; augmentations."""

from __future__ import annotations

import numpy as np
import pytest

from training import pipeline


def test_sample_weights_stay_with_their_labels_through_shuffling():
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1).repeat(3, axis=-1)
    images = np.tile(images, (1, 32, 32, 1))
    labels = np.arange(40) % 2
    weights = np.arange(40, dtype=np.float32) / 10  # weight i / 10 for image i
    ds = pipeline.make_dataset(
        images, labels, 2, batch_size=8, training=True, augment=False, weights=weights
    )
    seen = 0
    for x, y, w in ds:
        pixel = x.numpy()[:, 0, 0, 0].astype(int)  # image i is filled with the value i
        np.testing.assert_allclose(w.numpy(), pixel / 10, rtol=1e-6)
        np.testing.assert_array_equal(y.numpy().argmax(1), pixel % 2)
        seen += len(pixel)
    assert seen == 40
    with pytest.raises(ValueError, match="need labels"):
        pipeline.make_dataset(images, None, 2, weights=weights)


def _batch(kind: str, n: int = 16, size: int = 64) -> np.ndarray:
    if kind == "flat":
        return np.full((n, size, size, 3), 128, np.float32)
    ramp = np.linspace(20, 235, size, dtype=np.float32)[None, :, None, None]  # bright below
    return np.broadcast_to(ramp, (n, size, size, 3)).copy()


def test_scanner_augmentation_adds_speckle_and_gain_but_keeps_depth_downwards():
    import tensorflow as tf

    flat = tf.constant(_batch("flat"))
    centre = slice(24, 40)
    plain = pipeline.augment_batch(flat, seed=3).numpy()
    scanner = pipeline.augment_batch(flat, seed=3, scanner=True).numpy()
    for out in (plain, scanner):
        assert out.shape == flat.shape and np.isfinite(out).all()
        assert out.min() >= 0 and out.max() <= 255
    # A flat frame stays flat in its centre without scanner effects; speckle and the
    # depth gain ramp give it texture with them.
    assert plain[:, centre, centre].std(axis=(1, 2, 3)).max() < 1.0
    assert scanner[:, centre, centre].std(axis=(1, 2, 3)).mean() > 3.0
    # Overall gain varies more between frames.
    assert scanner.mean(axis=(1, 2, 3)).std() > plain.mean(axis=(1, 2, 3)).std()

    ramp = pipeline.augment_batch(tf.constant(_batch("ramp")), seed=5, scanner=True).numpy()
    top, bottom = (
        ramp[:, 16:24, 24:40].mean(axis=(1, 2, 3)),
        ramp[:, 40:48, 24:40].mean(axis=(1, 2, 3)),
    )
    assert (bottom > top).all()  # never flipped upside down


def test_training_dataset_with_scanner_augmentation_yields_valid_batches():
    images = _batch("ramp", n=20).astype(np.uint8)
    ds = pipeline.make_dataset(
        images,
        np.arange(20) % 2,
        2,
        batch_size=8,
        training=True,
        weights=np.ones(20, np.float32),
        scanner_augment=True,
    )
    shapes = [(x.shape[0], y.shape, w.shape) for x, y, w in ds]
    assert [s[0] for s in shapes] == [8, 8, 4]
    assert all(s[1][1] == 2 and s[2][0] == s[0] for s in shapes)


@pytest.mark.parametrize("scanner", [False, True])
def test_augmentation_is_the_same_every_run_and_new_every_epoch(scanner):
    """Per-batch stateless draws (pipeline.batch_seeds): tf.data's parallel calls cannot
    reorder them, so a seed gives one run; each epoch still draws anew."""
    images = np.random.default_rng(0).integers(0, 255, (24, 32, 32, 3)).astype(np.uint8)
    labels = np.arange(24) % 2

    def epochs(seed: int, n: int = 2) -> list[list[np.ndarray]]:
        ds = pipeline.make_dataset(
            images, labels, 2, batch_size=8, training=True, seed=seed, scanner_augment=scanner
        )
        return [[x.numpy() for x, _ in ds] for _ in range(n)]

    first, again = epochs(3), epochs(3)
    assert all(
        np.array_equal(a, b)
        for ea, eb in zip(first, again, strict=True)
        for a, b in zip(ea, eb, strict=True)
    )
    assert not np.array_equal(first[0][0], first[1][0])
    assert not np.array_equal(first[0][0], epochs(4, 1)[0][0])
