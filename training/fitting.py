"""Fitting helpers that the classifier (train.py) and the localiser share, below both."""

from __future__ import annotations

import keras
import mlflow
import numpy as np

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
