"""The scoring core: image bytes -> prepared frame -> model -> prediction. No HTTP here.

/v1, /v2 (encoded images), and every other way of scoring (the PACS gateway, archive
scoring) call these functions, so they all give the same numbers for the same bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from service import decoding
from service.models import LoadedModel
from service.schemas import ModelOut, PredictionOut
from thyroid_cad import imaging


@dataclass(frozen=True)
class Prepared:
    """A decoded upload and the model input made from it."""

    rgb: np.ndarray  # the decoded frame, H x W x 3 uint8
    square: np.ndarray  # the model input, S x S x 3 uint8
    geometry: imaging.Geometry  # how to map model-input pixels back onto `rgb`
    content_type: str
    decode_s: float
    prepare_s: float
    frame: int | None = None  # the multi-frame DICOM frame used (1-based)
    origin: tuple[int, int] = (0, 0)  # (row, col) of `rgb` in that frame (DICOM region crop)


@dataclass(frozen=True)
class Scored:
    prepared: Prepared
    probabilities: np.ndarray  # K
    heatmap: np.ndarray | None  # h x w x K at the model's map resolution
    prediction: PredictionOut
    queue_s: float
    inference_s: float
    batch_size: int


def prepare(data: bytes, size: int, max_pixels: int, frame: int | None = None) -> Prepared:
    """Decode (ApiError 4xx on bad bytes) and make the S x S model input.

    `frame`: which frame of a multi-frame DICOM (1-based; default the first).
    """
    t0 = time.perf_counter()
    decoded = decoding.decode(data, max_pixels, frame)
    t1 = time.perf_counter()
    square, geometry = imaging.prepare_with_geometry(decoded.rgb, size)
    t2 = time.perf_counter()
    return Prepared(
        decoded.rgb,
        square,
        geometry,
        decoded.content_type,
        t1 - t0,
        t2 - t1,
        decoded.frame,
        decoded.origin,
    )


def decide(card: dict, probs: np.ndarray) -> PredictionOut:
    """Most probable label, and the decision at the card's operating point."""
    names = card["class_names"]
    positive = card.get("positive_class", names[-1])
    p_index = names.index(positive)
    threshold = float(card["threshold"])
    if probs[p_index] >= threshold:
        decision = positive
    else:
        others = [i for i in range(len(names)) if i != p_index]
        decision = names[max(others, key=lambda i: probs[i])]
    return PredictionOut(
        label=names[int(np.argmax(probs))],
        probabilities={n: round(float(p), 6) for n, p in zip(names, probs, strict=True)},
        positive_class=positive,
        threshold=threshold,
        decision=decision,
    )


def describe_model(model: LoadedModel, alias: str | None) -> ModelOut:
    return ModelOut(
        name=model.name,
        version=model.version,
        alias=alias,
        source_run_id=model.card.get("source_run_id"),
        onnx_sha256=model.card["sha256"],
        provider=model.providers[0],
    )


def score(model: LoadedModel, prepared: Prepared) -> Scored:
    """Run one prepared frame through the model's batcher and decide."""
    t0 = time.perf_counter()
    result = model.infer(prepared.square[None])
    waited = time.perf_counter() - t0
    return Scored(
        prepared=prepared,
        probabilities=result.probabilities[0],
        heatmap=None if result.heatmap is None else result.heatmap[0],
        prediction=decide(model.card, result.probabilities[0]),
        queue_s=result.queue_s,
        inference_s=waited - result.queue_s,
        batch_size=result.batch_size,
    )


def score_bytes(
    model: LoadedModel, data: bytes, max_pixels: int, frame: int | None = None
) -> Scored:
    """Decode, prepare and score one encoded image (PNG, JPEG, BMP, TIFF, DICOM)."""
    return score(model, prepare(data, model.input_size, max_pixels, frame))
