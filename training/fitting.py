"""Fitting helpers that the classifier (train.py) and the localiser share, below both."""

from __future__ import annotations

import keras
import mlflow
import numpy as np

from thyroid_cad.files import sha256_file
from training import models
from training import weights as weight_files
from training.data import Dataset


class MlflowEpochLogger(keras.callbacks.Callback):
    """Per-epoch training metrics to MLflow; keeps counting across fine-tuning phases."""

    def __init__(self, history: dict[str, list[float]], offset: int = 0):
        super().__init__()
        self.history = history
        self.offset = offset

    def on_epoch_end(self, epoch, logs=None):
        logs = {k: float(v) for k, v in (logs or {}).items()}
        for k, v in logs.items():
            self.history.setdefault(k, []).append(v)
        mlflow.log_metrics({f"epoch_{k}": v for k, v in logs.items()}, step=self.offset + epoch)


def subsample(dataset: Dataset, max_images: int | None, seed: int) -> Dataset:
    if not max_images or max_images >= len(dataset.records):
        return dataset
    rng = np.random.default_rng(seed)
    labels = np.asarray(dataset.labels)
    keep: list[int] = []
    for c in np.unique(labels):  # stratified, so rare classes survive
        idx = np.flatnonzero(labels == c)
        n = max(1, round(max_images * len(idx) / len(labels)))
        keep += rng.choice(idx, size=min(n, len(idx)), replace=False).tolist()
    return dataset.subset(sorted(keep))


# How many training images the TFLite import is compared on (log_weights).
WEIGHT_PARITY_IMAGES = 8


def log_weights(backbone: str, weights: str | None, images: np.ndarray) -> dict:
    """Where the backbone's weights came from (path + sha256; 'imagenet': Keras'
    cache) and, for an imported TFLite file, how closely the import reproduces it on
    the first WEIGHT_PARITY_IMAGES of `images`: logged, and returned for the model card."""
    weights = models.resolve_weights(weights)
    if weights is None:
        return {}
    if weights == "imagenet":
        mlflow.log_params({"weights_source": "keras-imagenet"})
        return {"weights": "imagenet (Keras' cache, md5-checked by Keras)"}
    provenance = {
        "weights_source": "file",
        "weights_sha256": sha256_file(weights),
        "weights_format": "tflite" if weight_files.is_tflite(weights) else "h5",
    }
    parity = models.import_parity(backbone, weights, images[:WEIGHT_PARITY_IMAGES])
    mlflow.log_params(provenance)
    mlflow.log_metrics(parity)
    return {"weights": weights, **provenance, **({"parity": parity} if parity else {})}
