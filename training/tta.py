"""Test-time augmentation (TTA): the views of an image, as Keras layers.

One definition serves training (`train --tta`: validation and test scored on the mean
over the views, training.train) and the exported graph (training.ensemble builds the
same layers into ONNX), so a run is evaluated as its export will answer.

Views (VIEWS[mode]): the image; its left-right mirror; shifts by SHIFT of the side,
zero-filled like the letterbox bars; zooms by ZOOM, in by a centre crop resized up, out
by resizing down and padding. Only left-right flips: an ultrasound frame's depth axis
(skin at the top) is not symmetric, so vertical flips are images no scanner makes.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from training import models

VIEWS = {
    "none": ("identity",),
    "flips": ("identity", "flip"),
    "full": (
        "identity",
        "flip",
        "shift_left",
        "shift_right",
        "shift_up",
        "shift_down",
        "zoom_in",
        "zoom_out",
    ),
}
HEATMAP_VIEWS = ("identity", "flip")  # the views whose maps can be mapped back exactly
SHIFT = 0.05  # of the image side
ZOOM = 0.10  # zoom in to 1 + ZOOM, out to 1 - ZOOM


@keras.saving.register_keras_serializable(package="thyroid_cad")
class View(layers.Layer):
    """One test-time view of a float N x S x S x 3 image (see VIEWS)."""

    def __init__(self, view: str, **kwargs):
        super().__init__(**kwargs)
        if view not in VIEWS["full"]:
            raise ValueError(f"unknown view {view!r}; choose from {VIEWS['full']}")
        self.view = view

    def call(self, x):
        size = x.shape[1]
        d = max(1, round(SHIFT * size))
        if self.view == "identity":
            return x
        if self.view == "flip":
            return ops.flip(x, axis=2)
        if self.view.startswith("shift_"):
            # content moves by d pixels; the strip it leaves is black, as letterbox bars
            pads = {
                "shift_left": ((0, 0), (0, 0), (0, d), (0, 0)),
                "shift_right": ((0, 0), (0, 0), (d, 0), (0, 0)),
                "shift_up": ((0, 0), (0, d), (0, 0), (0, 0)),
                "shift_down": ((0, 0), (d, 0), (0, 0), (0, 0)),
            }[self.view]
            padded = ops.pad(x, pads)
            top = d if self.view == "shift_up" else 0
            left = d if self.view == "shift_left" else 0
            return padded[:, top : top + size, left : left + size, :]
        if self.view == "zoom_in":
            crop = round(size / (1 + ZOOM))
            o = (size - crop) // 2
            return _resize(x[:, o : o + crop, o : o + crop, :], size)
        small = round(size * (1 - ZOOM))  # zoom_out
        o = (size - small) // 2
        return ops.pad(
            _resize(x, small), ((0, 0), (o, size - small - o), (o, size - small - o), (0, 0))
        )

    def get_config(self):
        return {**super().get_config(), "view": self.view}


def _resize(x, size: int):
    return ops.image.resize(x, (size, size), interpolation="bilinear", antialias=False)


def predict_views(model: keras.Model, images: np.ndarray, mode: str, batch: int = 32):
    """The mean over VIEWS[mode] of a Keras model's probabilities on uint8 images: what
    the exported graph of one member computes (training's `--tta` evaluates with it)."""
    net = models.with_heatmaps(model)
    total = None
    for v in VIEWS[mode]:
        view = View(v)
        probs = np.concatenate(
            [
                np.asarray(net(view(images[i : i + batch].astype("float32")))["probabilities"])
                for i in range(0, len(images), batch)
            ]
        )
        total = probs if total is None else total + probs
    return total / len(VIEWS[mode])
