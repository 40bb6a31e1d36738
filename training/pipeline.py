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


def augment_batch(images: tf.Tensor, seed: int) -> tf.Tensor:
    """Ultrasound-sensible augmentation of a float32 batch (0-255), one warp per image.

    Left-right flips (lobes and probe orientation vary) but no vertical flip: depth runs
    downwards and acoustic shadows fall below what casts them. Small rotations, zooms
    and shifts (probe angle and pressure) are composed into ONE projective transform per
    image (one resampling pass instead of three separate Keras layers: ~4x faster here),
    then brightness and contrast (gain settings).
    """
    shape = tf.shape(images)
    n, h, w = shape[0], tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)

    def uniform(lo, hi, offset):
        return tf.random.uniform([n], lo, hi, seed=seed + offset)

    theta = uniform(-ROTATION, ROTATION, 1)
    inv_zoom = 1.0 / uniform(1.0 - ZOOM, 1.0 + ZOOM, 2)
    tx, ty = uniform(-SHIFT, SHIFT, 3) * w, uniform(-SHIFT, SHIFT, 4) * h
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
    mean = tf.reduce_mean(warped, axis=[1, 2, 3], keepdims=True)
    contrast = tf.reshape(uniform(1.0 - CONTRAST, 1.0 + CONTRAST, 6), [-1, 1, 1, 1])
    brightness = tf.reshape(uniform(-BRIGHTNESS, BRIGHTNESS, 7), [-1, 1, 1, 1])
    return tf.clip_by_value((warped - mean) * contrast + mean + brightness, 0.0, 255.0)


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray | None,
    num_classes: int,
    batch_size: int = 32,
    training: bool = False,
    augment: bool = True,
    seed: int = 0,
) -> tf.data.Dataset:
    """Batches of (float32 0-255 images, one-hot labels), prefetched."""
    x = tf.data.Dataset.from_tensor_slices(images)
    ds = (
        x
        if labels is None
        else tf.data.Dataset.zip(
            (x, tf.data.Dataset.from_tensor_slices(tf.one_hot(labels, num_classes)))
        )
    )
    if training:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    cast = (
        (lambda im, y: (tf.cast(im, tf.float32), y))
        if labels is not None
        else (lambda im: tf.cast(im, tf.float32))
    )
    ds = ds.map(cast, num_parallel_calls=tf.data.AUTOTUNE)
    if training and augment:
        ds = ds.map(lambda im, y: (augment_batch(im, seed), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
