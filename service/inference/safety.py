"""The out-of-distribution verdict of one image, and the policy that acts on it.

Two checks (docs/safety.md): the modality check of the decoded frame
(thyroid_cad.modality: colour photographs, documents, blank frames) and the model's
own `ood_score` graph output against the threshold in its card (training/ood.py:
images unlike the training images in the model's feature space, radiographs among
them). Either one flags the image.
"""

from __future__ import annotations

import numpy as np

from service.errors import ApiError
from service.schemas import OodOut
from thyroid_cad import modality

OUTPUT_NAME = "ood_score"
NO_REFERENCE = "model has no OOD reference"


def assess(card: dict, score: float | None, verdict: modality.Verdict | None) -> OodOut:
    """The `ood` block of an answer: the model's score against its card, the modality."""
    block = card.get("ood") or {}
    threshold = block.get("threshold")
    has_score = score is not None and threshold is not None and np.isfinite(score)
    value = round(float(score), 4) if has_score else None
    limit = round(float(threshold), 4) if has_score else None
    if verdict is not None and not verdict.ultrasound_like:
        return OodOut(score=value, threshold=limit, in_distribution=False, reason=verdict.reason)
    if not has_score:
        return OodOut(score=None, threshold=None, in_distribution=True, reason=NO_REFERENCE)
    if score > threshold:
        reason = (
            f"unlike the images the model was trained on: score {score:.2f} is above the "
            f"threshold {threshold:.2f} that {block.get('quantile', 0.95):.0%} of its "
            "validation images fall below"
        )
        return OodOut(score=value, threshold=limit, in_distribution=False, reason=reason)
    return OodOut(score=value, threshold=limit, in_distribution=True, reason=None)


def of_outputs(
    card: dict, outputs: dict[str, np.ndarray], frames: list[np.ndarray]
) -> list[OodOut]:
    """assess() for every row of a batch: the graph's outputs by name, the frames checked."""
    scores = outputs.get(OUTPUT_NAME)
    return [
        assess(card, None if scores is None else float(scores[i]), modality.check(frame))
        for i, frame in enumerate(frames)
    ]


def record(ood: list[OodOut]) -> dict:
    """The audit columns of a request's verdict (the worst image of a batch)."""
    scores = [o.score for o in ood if o.score is not None]
    return {
        "ood_score": max(scores) if scores else None,
        "in_distribution": all(o.in_distribution for o in ood),
    }


def enforce(policy: str, ood: list[OodOut]) -> None:
    """Under the `refuse` policy, an image out of distribution ends the request.

    Raises:
        ApiError: 422 `out_of_distribution`, naming why (no probabilities are given).
    """
    flagged = [o for o in ood if not o.in_distribution]
    if policy == "refuse" and flagged:
        raise ApiError(
            422,
            "out_of_distribution",
            f"not answered: {flagged[0].reason} (policy THYROID_CAD_OOD_POLICY=refuse)",
        )


def roi_record(roi) -> dict:
    """The audit columns of the ROI a prediction used (a RoiOut, or None: whole frame)."""
    if roi is None:
        return {"roi_source": None}
    x, y, w, h = roi.box or (None, None, None, None)
    return {"roi_x": x, "roi_y": y, "roi_w": w, "roi_h": h, "roi_source": roi.source}
