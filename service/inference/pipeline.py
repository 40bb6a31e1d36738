"""The scoring core: image bytes -> prepared frame -> model -> prediction. No HTTP here.

/v1, /v2 (encoded images), and every other way of scoring (the PACS gateway, archive
scoring) call these functions, so they all give the same numbers for the same bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from service.errors import ApiError
from service.inference import decoding, safety
from service.inference.admission import Ticket
from service.inference.models import LoadedModel
from service.schemas import ModelOut, OodOut, PredictionOut, RoiOut, ShapeOut
from thyroid_cad import imaging, nodule, tirads


@dataclass(frozen=True)
class Located:
    """The region of interest a ROI model classified, and the nodule's shape."""

    roi: RoiOut
    shape: ShapeOut | None
    # The same box in the decoded frame's pixels (what the model's input is cut from;
    # they differ from roi's when the frame was decoded at the working resolution).
    frame_box: imaging.Box | None = None


@dataclass(frozen=True)
class Prepared:
    """A decoded upload and the model input made from it."""

    rgb: np.ndarray  # the decoded frame, H x W x 3 uint8 (at the working resolution)
    square: np.ndarray  # the model input, S x S x 3 uint8
    # How to map model-input pixels back onto the image as sent (`size`), which `rgb`
    # shows at a reduced resolution when it was decoded smaller (decoding.working_side).
    geometry: imaging.Geometry
    content_type: str
    decode_s: float
    prepare_s: float
    frame: int | None = None  # the multi-frame DICOM frame used (1-based)
    origin: tuple[int, int] = (0, 0)  # (row, col) of `rgb` in that frame (DICOM region crop)
    located: Located | None = None  # ROI models only (boxes in the image's pixels as sent)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image as sent."""
        return self.geometry.height, self.geometry.width


@dataclass(frozen=True)
class Scored:
    prepared: Prepared
    probabilities: np.ndarray  # K
    heatmap: np.ndarray | None  # h x w x K at the model's map resolution
    prediction: PredictionOut
    queue_s: float
    inference_s: float
    batch_size: int
    ood: OodOut | None = None  # the out-of-distribution verdict (service.inference.safety)


def parse_roi(text: str | None) -> imaging.Box | None:
    """`x,y,w,h` from a request (None: not given), or ApiError 400 `invalid_roi`."""
    if text is None:
        return None
    try:
        return imaging.parse_roi(text)
    except imaging.RoiError as e:
        raise ApiError(400, "invalid_roi", str(e)) from e


def locate(
    model: LoadedModel, decoded: decoding.Decoded, roi: imaging.Box | None
) -> Located | None:
    """The box a ROI model classifies: the user's, else its localiser's proposal.

    None for whole-frame models (which refuse a box). The shape comes from the
    localiser's outline of the nodule (the one the user's box holds, when there is one).
    Boxes and shapes are in the pixels of the image as sent (decoded.size), also when
    the frame was decoded at a reduced resolution.

    Raises:
        ApiError: 400 for a box outside the image or of zero size, a box sent to a
            whole-frame model, or no box for a ROI model without a localiser.
    """
    if not model.roi:
        if roi is not None:
            raise ApiError(
                400,
                "roi_not_supported",
                f"{model.name} v{model.version} classifies whole frames and takes no roi",
            )
        return None
    height, width = decoded.size
    if roi is not None:
        try:
            roi = imaging.check_roi(roi, height, width)
        except imaging.RoiError as e:
            raise ApiError(400, "invalid_roi", str(e)) from e
    # the user's box in the decoded frame's pixels (the same unless decoded smaller)
    within = None if roi is None else imaging.scale_box(roi, decoded.size, decoded.rgb.shape[:2])
    proposal = model.localise(decoded.rgb, within) if model.localiser is not None else None
    shape = None
    if proposal is not None and proposal.box is not None:
        measures = _as_sent(nodule.shape(proposal.mask, decoded.spacing_mm), decoded)
        shape = ShapeOut(**measures, score=round(proposal.score, 4))
    if roi is not None:
        return Located(RoiOut.of(roi, "user"), shape, within)
    if proposal is None:
        raise ApiError(
            400,
            "roi_required",
            f"{model.name} v{model.version} classifies a nodule box and bundles no localiser "
            "to propose one: give roi=x,y,w,h",
        )
    if proposal.box is None:  # nothing found: the whole frame, as in training
        return Located(RoiOut(source="none"), None)
    box = imaging.scale_box(proposal.box, decoded.rgb.shape[:2], decoded.size)
    return Located(RoiOut.of(box, "localiser"), shape, proposal.box)


def _as_sent(measures: dict, decoded: decoding.Decoded) -> dict:
    """nodule.shape() measures on the decoded frame in the pixels of the image as sent
    (the same unless it was decoded at a reduced resolution; mm and ratios are kept)."""
    (height, width), (h, w) = decoded.size, decoded.rgb.shape[:2]
    if (height, width) == (h, w):
        return measures
    sx, sy = width / w, height / h
    return {
        **measures,
        "width_px": round(measures["width_px"] * sx),
        "depth_px": round(measures["depth_px"] * sy),
        "area_px": round(measures["area_px"] * sx * sy),
    }


def prepare(
    data: bytes,
    size: int,
    max_pixels: int,
    model: LoadedModel | None = None,
    roi: imaging.Box | None = None,
    frame: int | None = None,
    ticket: Ticket | None = None,
) -> Prepared:
    """Decode (ApiError 4xx on bad bytes) and make the S x S model input.

    Pass the model: a ROI model's input is the square around the nodule box (`roi`, or
    its localiser's), with the margin of its card. `frame`: which frame of a multi-frame
    DICOM (1-based; default the first). `ticket`: the request's share of the decoding
    budget (service/inference/admission.py), taken before decoding (ApiError 503 `busy`
    when there is no room) and given back by its holder. A frame at least twice as long
    as decoding.working_side(size) is decoded at a reduced resolution; the geometry and
    boxes still describe the image as sent.
    """
    t0 = time.perf_counter()
    if ticket is not None:
        ticket.take(decoding.pixels(data))
    decoded = decoding.decode(data, max_pixels, frame, decoding.working_side(size))
    t1 = time.perf_counter()
    located = locate(model, decoded, roi) if model is not None else None
    box = located.frame_box if located is not None else None
    margin = float(model.roi["margin"]) if box is not None else imaging.ROI_MARGIN
    square, geometry = imaging.prepare_input(decoded.rgb, size, box, margin)
    geometry = imaging.rescale(geometry, *decoded.size)
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
        located,
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


def with_descriptors(
    card: dict, prediction: PredictionOut, outputs: dict, shape: ShapeOut | None
) -> PredictionOut:
    """The prediction with TI-RADS descriptor estimates and points, for models whose card
    lists `descriptors` (read from the `descriptor_<name>` outputs, by name); others as is.

    `outputs` holds one image's row of every graph output.
    """
    heads = card.get("descriptors") or {}
    if not heads:
        return prediction
    found, estimate = tirads.describe(
        {d: outputs[tirads.output_name(d)] for d in heads},
        None if shape is None else shape.taller_than_wide,
    )
    return PredictionOut.model_validate(
        {**prediction.model_dump(), "descriptors": found, "tirads": estimate}
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
    shape = prepared.located.shape if prepared.located else None
    prediction = with_descriptors(
        model.card,
        decide(model.card, result.probabilities[0]),
        {name: values[0] for name, values in result.outputs.items()},
        shape,
    )
    return Scored(
        prepared=prepared,
        probabilities=result.probabilities[0],
        heatmap=None if result.heatmap is None else result.heatmap[0],
        prediction=prediction,
        queue_s=result.queue_s,
        inference_s=waited - result.queue_s,
        batch_size=result.batch_size,
        ood=safety.of_outputs(model.card, result.outputs, [prepared.square])[0],
    )


def score_bytes(
    model: LoadedModel,
    data: bytes,
    max_pixels: int,
    frame: int | None = None,
    roi: imaging.Box | None = None,
) -> Scored:
    """Decode, prepare and score one encoded image (PNG, JPEG, BMP, TIFF, DICOM)."""
    return score(model, prepare(data, model.input_size, max_pixels, model, roi, frame))
