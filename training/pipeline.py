"""The training input pipeline: decode once, cache, then tf.data with augmentation.

Each image is decoded, cropped and letterboxed once (thyroid_cad.imaging, the same
code the service runs) in a thread pool, and the uint8 arrays are cached on disk
keyed by content, size and preprocessing version. Epochs then only shuffle, augment
and batch in-memory tensors, with prefetching, instead of re-decoding JPEGs every
epoch as Keras' ImageDataGenerator did in the seed notebooks.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tensorflow as tf

from thyroid_cad import imaging
from thyroid_cad.settings import cache_dir

log = logging.getLogger(__name__)


def decode_all(
    paths: list[Path],
    size: int,
    rois: list[imaging.Box | None] | None = None,
    margin: float = imaging.ROI_MARGIN,
) -> np.ndarray:
    """Decode and prepare images in parallel -> uint8 array N x size x size x 3.

    With `rois`, image i is the nodule-centred square around rois[i] (None: the whole
    frame), as thyroid_cad.imaging.prepare_input makes it.
    """
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = imaging.load_prepared(paths[i], size, rois[i] if rois else None, margin)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        list(pool.map(work, range(len(paths))))
    return out


def cached(kind: str, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """compute() once, then THYROID_CAD_HOME/cache/<kind>-<hash of key>.npy."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    path = cache_dir() / f"{kind}-{digest}.npy"
    if path.is_file():
        log.info("%s cache hit: %s", kind, path)
        return np.load(path)
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arrays)
    tmp.replace(path)  # atomic: parallel runs never read half a file
    return arrays


def load_images(
    paths: list[Path],
    sha256: list[str],
    size: int,
    rois: list[imaging.Box | None] | None = None,
    margin: float = imaging.ROI_MARGIN,
) -> np.ndarray:
    """decode_all with an on-disk cache keyed by file contents, size and preprocessing
    (and, with ROIs, every box and the margin)."""
    key = f"{imaging.PREPROCESSING_VERSION}|{size}|{'|'.join(sha256)}"
    if rois is not None:
        boxes = "|".join(",".join(map(str, b)) if b else "-" for b in rois)
        key += f"|roi{imaging.ROI_PREPROCESSING_VERSION}|{margin}|{boxes}"
    return cached("images", key, lambda: decode_all(paths, size, rois, margin))


# Augmentation ranges: rotation (radians), zoom, shift (fraction of the side),
# brightness (0-255 levels) and contrast factor.
ROTATION = 0.19  # ~11 degrees
ZOOM = 0.10
SHIFT = 0.05
BRIGHTNESS = 25.0
CONTRAST = 0.20
# Scanner-varying augmentation (--scanner-augment): what differs between machines and
# their settings rather than between nodules.
CROP = 0.25  # random crop of up to 25% of the side, anywhere in the frame (field of view)
CURVE = 0.5  # grey-level curve x + a x (1 - x), |a| <= 0.5 (dynamic range / compression)
DEPTH_GAIN = 0.3  # time-gain compensation: up to +-30% gain from top to bottom
SCANNER_BRIGHTNESS = 40.0  # overall gain, wider than BRIGHTNESS
SCANNER_CONTRAST = 0.35
SPECKLE = 0.20  # largest sd of multiplicative noise, correlated over 2x2 pixels
DOWNSCALE = 0.35  # resolution: down to this fraction of the side and back up, ...
DOWNSCALE_P = 0.5  # ... on about this share of the batches


def batch_seeds(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
    """`ds`'s batches, each paired with its own int64 seed: new seeds every epoch, the
    same ones every run. Augmentations draw from these statelessly (`draw`), so their
    results cannot depend on the order tf.data's parallel calls happen to run in (stateful
    draws did: the same seed gave different runs)."""
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return tf.data.Dataset.zip(ds, seeds)


def draw(seed: tf.Tensor | int, offset: int, shape, lo=0.0, hi=1.0, normal=False) -> tf.Tensor:
    """Uniform in [lo, hi) (or standard normal) of `shape`, a function of (seed, offset)."""
    pair = tf.stack([tf.cast(seed, tf.int64), tf.constant(offset, tf.int64)])
    if normal:
        return tf.random.stateless_normal(shape, pair)
    return tf.random.stateless_uniform(shape, pair, lo, hi)


def augment_batch(images: tf.Tensor, seed: tf.Tensor | int, scanner: bool = False) -> tf.Tensor:
    """Ultrasound-sensible augmentation of a float32 batch (0-255), one warp per image.

    Left-right flips (lobes and probe orientation vary) but no vertical flip: depth runs
    downwards and acoustic shadows fall below what casts them. Small rotations, zooms
    and shifts (probe angle and pressure) are composed into ONE projective transform per
    image (one resampling pass instead of three separate Keras layers: ~4x faster here),
    then brightness and contrast (gain settings).

    With ``scanner``, also what scanners differ in: a random crop (folded into the same
    warp), lower resolution (down- and up-sampling, on part of the batches),
    multiplicative speckle noise, a depth gain ramp (TGC), a grey-level curve (log
    compression) and wider brightness and contrast.

    Every draw is a function of `seed` (a batch's own, from batch_seeds).
    """
    shape = tf.shape(images)
    n, h, w = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)

    def uniform(lo, hi, offset):
        return draw(seed, offset, [n], lo, hi)

    theta = uniform(-ROTATION, ROTATION, 1)
    inv_zoom = 1.0 / uniform(1.0 - ZOOM, 1.0 + ZOOM, 2)
    tx, ty = uniform(-SHIFT, SHIFT, 3) * w, uniform(-SHIFT, SHIFT, 4) * h
    if scanner:
        # A crop of side `keep` centred anywhere it fits: input centre moves by about
        # keep * t, so t up to (1 - keep) / 2 / keep of the side keeps it in the frame.
        keep = uniform(1.0 - CROP, 1.0, 11)
        room = (1.0 - keep) / 2.0 / keep
        inv_zoom = inv_zoom * keep
        tx = tx + uniform(-1.0, 1.0, 12) * room * w
        ty = ty + uniform(-1.0, 1.0, 13) * room * h
    flip = tf.where(uniform(0.0, 1.0, 5) < 0.5, -1.0, 1.0)
    cos, sin = tf.cos(theta) * inv_zoom, tf.sin(theta) * inv_zoom
    # Output pixel p maps to input M (p - c - t) + c, M = R(theta) / zoom * diag(flip, 1).
    m00, m01, m10, m11 = cos * flip, -sin, sin * flip, cos
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    a2 = cx - m00 * (cx + tx) - m01 * (cy + ty)
    b2 = cy - m10 * (cx + tx) - m11 * (cy + ty)
    zeros = tf.zeros_like(m00)
    transforms = tf.stack([m00, m01, a2, m10, m11, b2, zeros, zeros], axis=1)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
    brightness_range, contrast_range = BRIGHTNESS, CONTRAST
    if scanner:
        warped = _scanner_effects(warped, shape, n, seed)
        brightness_range, contrast_range = SCANNER_BRIGHTNESS, SCANNER_CONTRAST
    mean = tf.reduce_mean(warped, axis=[1, 2, 3], keepdims=True)
    contrast = tf.reshape(uniform(1.0 - contrast_range, 1.0 + contrast_range, 6), [-1, 1, 1, 1])
    brightness = tf.reshape(uniform(-brightness_range, brightness_range, 7), [-1, 1, 1, 1])
    return tf.clip_by_value((warped - mean) * contrast + mean + brightness, 0.0, 255.0)


def _scanner_effects(x: tf.Tensor, shape: tf.Tensor, n: tf.Tensor, seed) -> tf.Tensor:
    """Resolution, speckle, depth gain and a grey-level curve on a float32 batch (0-255).

    Cheap by construction (docs/benchmarks.md): the resolution change is one resize pair
    for a whole batch (skipped on the others), speckle and depth gain are one grey map
    per image, and the curve is a quadratic rather than a power.
    """
    size = shape[1:3]

    def per_image(lo, hi, offset):
        return tf.reshape(draw(seed, offset, [n], lo, hi), [-1, 1, 1, 1])

    def lower_resolution():
        factor = draw(seed, 21, [], DOWNSCALE, 1.0)
        small = tf.maximum(tf.cast(tf.cast(size, tf.float32) * factor, tf.int32), 8)
        return tf.image.resize(tf.image.resize(x, small, method="area"), size)

    x = tf.cond(draw(seed, 22, []) < DOWNSCALE_P, lower_resolution, lambda: x)
    # Speckle (grey noise drawn at half resolution: correlated over ~2 px) and the depth
    # gain ramp (TGC), both multiplicative and before compression, as in a scanner.
    half = tf.maximum(size // 2, 1)
    noise = tf.image.resize(draw(seed, 23, tf.stack([n, half[0], half[1], 1]), normal=True), size)
    depth = tf.reshape(tf.linspace(-1.0, 1.0, size[0]), [1, -1, 1, 1])
    gain = tf.maximum(1.0 + per_image(0.0, SPECKLE, 24) * noise, 0.0) * (
        1.0 + per_image(-DEPTH_GAIN, DEPTH_GAIN, 26) * depth
    )
    # A monotone grey-level curve (like a gamma of ~0.6-1.6, at a fraction of pow's cost).
    u = tf.clip_by_value(x * gain / 255.0, 0.0, 1.0)
    return 255.0 * (u + per_image(-CURVE, CURVE, 25) * u * (1.0 - u))


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray | None,
    num_classes: int,
    batch_size: int = 32,
    training: bool = False,
    augment: bool = True,
    seed: int = 0,
    weights: np.ndarray | None = None,
    scanner_augment: bool = False,
    extra_targets: dict[str, np.ndarray] | None = None,
) -> tf.data.Dataset:
    """Batches of float32 0-255 images, with one-hot labels and sample weights if given.

    Elements are ``images``, ``(images, labels)`` or ``(images, labels, weights)``: the
    forms Keras' fit takes (weights scale each image's loss).

    `extra_targets` ({output name: N x C one-hot, all-zero rows where unknown}; the
    descriptor heads) makes labels and weights dicts by output: ``probabilities`` gets
    the labels and `weights` (1 without), every extra output its target and a weight of
    1 where it is known, 0 where not (the masked loss of training.descriptors).
    """
    if (weights is not None or extra_targets) and labels is None:
        raise ValueError("sample weights and extra targets need labels")
    parts = [images]
    if extra_targets:
        n = len(images)
        w = np.ones(n, np.float32) if weights is None else np.asarray(weights, np.float32)
        parts.append({"probabilities": tf.one_hot(labels, num_classes), **extra_targets})
        parts.append(
            {
                "probabilities": w,
                **{k: (v.sum(axis=1) > 0).astype(np.float32) for k, v in extra_targets.items()},
            }
        )
        weights = labels = None  # both are in the dicts
    if labels is not None:
        parts.append(tf.one_hot(labels, num_classes))
    if weights is not None:
        parts.append(np.asarray(weights, dtype=np.float32))
    ds = tf.data.Dataset.from_tensor_slices(tuple(parts) if len(parts) > 1 else images)

    def on_images(fn):
        return (lambda im, *rest: (fn(im), *rest)) if len(parts) > 1 else fn

    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(on_images(lambda im: tf.cast(im, tf.float32)), num_parallel_calls=tf.data.AUTOTUNE)
    if training and augment:

        def augment_one(batch, batch_seed):
            return on_images(lambda im: augment_batch(im, batch_seed, scanner=scanner_augment))(
                *(batch if len(parts) > 1 else (batch,))
            )

        ds = batch_seeds(ds, seed).map(augment_one, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
