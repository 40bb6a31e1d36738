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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from thyroid_cad import imaging
from thyroid_cad.settings import cache_dir

log = logging.getLogger(__name__)


def decode_all(paths: list[Path], size: int) -> np.ndarray:
    """Decode and prepare images in parallel -> uint8 array N x size x size x 3."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = imaging.load_prepared(paths[i], size)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
        list(pool.map(work, range(len(paths))))
    return out


def load_images(paths: list[Path], sha256: list[str], size: int) -> np.ndarray:
    """decode_all with an on-disk cache keyed by file contents, size and preprocessing."""
    key = hashlib.sha256(
        f"{imaging.PREPROCESSING_VERSION}|{size}|{'|'.join(sha256)}".encode()
    ).hexdigest()[:20]
    path = cache_dir() / f"images-{key}.npy"
    if path.is_file():
        log.info("image cache hit: %s", path)
        return np.load(path)
    arrays = decode_all(paths, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arrays)
    tmp.replace(path)  # atomic: parallel runs never read half a file
    return arrays


def augmenter(seed: int) -> keras.Sequential:
    """Ultrasound-sensible augmentation.

    Left-right flips (lobes and probe orientation vary) but no vertical flip: depth runs
    downwards and acoustic shadows fall below what casts them. Small rotations, zooms
    and shifts (probe angle, pressure), brightness and contrast (gain settings).
    """
    return keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomRotation(0.03, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2),
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed + 3),
            keras.layers.RandomContrast(0.2, value_range=(0, 255), seed=seed + 4),
            keras.layers.RandomBrightness(0.1, value_range=(0, 255), seed=seed + 5),
        ],
        name="augment",
    )


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
        aug = augmenter(seed)
        ds = ds.map(lambda im, y: (aug(im, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
