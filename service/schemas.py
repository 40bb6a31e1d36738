"""Response models of the /v1 API; they are its OpenAPI schema."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# The largest model version, audit offset or model_version filter accepted: the SQL
# INTEGER the registry and the audit database store (larger values are refused as bad
# input, not passed on to fail inside a driver).
SQL_INT_MAX = 2**31 - 1

DISCLAIMER = (
    "Research software: not for diagnostic use. The probabilities and heatmap support, "
    "and never replace, the judgement of a qualified clinician."
)


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code, e.g. unsupported_media_type.")
    message: str = Field(description="What is wrong, for a person.")


class ErrorOut(BaseModel):
    """Every /v1 and ops error: {"error": {"code", "message"}}."""

    error: ErrorDetail


class ModelOut(BaseModel):
    name: str
    version: int
    alias: str | None
    source_run_id: str | None
    onnx_sha256: str
    provider: str


class DescriptorOut(BaseModel):
    """One ACR TI-RADS descriptor as the model estimates it (models with descriptor heads)."""

    descriptor: str = Field(description="composition, echogenicity, margin or echogenic_foci.")
    value: str = Field(description="The most probable ACR category.")
    probability: float = Field(description="The model's probability of that category.")
    points: int = Field(description="ACR TI-RADS points of that category.")


class TiradsOut(BaseModel):
    """ACR TI-RADS points and level from the descriptor estimates (and the nodule's shape
    where the localiser outlined it): a model estimate, not a radiologist's reading."""

    points: int
    level: str = Field(description="TR1 to TR5.")
    complete: bool = Field(description="Every category, shape included, was estimated.")
    shape_points: int | None = Field(
        None, description="Taller-than-wide points from the returned shape; null without one."
    )
    estimate: Literal[True] = True
    note: str


class PredictionOut(BaseModel):
    label: str = Field(description="Most probable class.")
    probabilities: dict[str, float]
    positive_class: str
    threshold: float = Field(description="Operating point on P(positive class), from validation.")
    decision: str = Field(description="Label at the operating point.")
    descriptors: list[DescriptorOut] | None = Field(
        None, description="TI-RADS descriptor estimates; null for models without the heads."
    )
    tirads: TiradsOut | None = Field(
        None, description="TI-RADS points and level estimated from them; null without heads."
    )


class HeatmapOut(BaseModel):
    available: bool
    class_name: str | None = Field(None, alias="class")
    format: str | None = None
    width: int | None = None
    height: int | None = None
    data: str | list | None = Field(None, description="base64 PNG, or nested list for array.")
    reason: str | None = None

    model_config = {"populate_by_name": True}


class RoiOut(BaseModel):
    """The region of interest the model classified, in the uploaded image's pixels."""

    x: int | None = None
    y: int | None = None
    w: int | None = None
    h: int | None = None
    source: Literal["user", "localiser", "none"] = Field(
        description="user: the box sent; localiser: proposed by the model's bundled "
        "localiser; none: it found no nodule and the whole frame was classified."
    )

    @classmethod
    def of(cls, box: tuple[int, int, int, int], source: str) -> RoiOut:
        x, y, w, h = box
        return cls(x=x, y=y, w=w, h=h, source=source)

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        return None if self.x is None else (self.x, self.y, self.w, self.h)


class ShapeOut(BaseModel):
    """The nodule's shape from the localiser's outline: a model estimate, not a measurement
    by a clinician."""

    width_px: int = Field(description="Extent across the beam (columns).")
    depth_px: int = Field(description="Extent along the beam (rows).")
    area_px: int
    taller_than_wide_ratio: float = Field(
        description="depth / width (physical lengths when spacing_mm is known); ACR TI-RADS "
        "counts taller-than-wide (> 1 on a transverse image) as a malignancy sign."
    )
    taller_than_wide: bool
    width_mm: float | None = None
    depth_mm: float | None = None
    area_mm2: float | None = None
    spacing_mm: list[float] | None = Field(
        None, description="mm per pixel (x, y) from DICOM ultrasound regions, when known."
    )
    score: float = Field(description="Highest localiser probability inside the outline.")


class OodOut(BaseModel):
    """Is this image like the ones the model was trained on? (docs/safety.md)"""

    score: float | None = Field(
        description="Mahalanobis distance of the image's features to the training images "
        "(the graph's ood_score); null for models exported without an OOD reference."
    )
    threshold: float | None = Field(
        description="95th percentile of the score on validation images (model card)."
    )
    in_distribution: bool = Field(
        description="false: unlike the training images, or not an ultrasound frame at all; "
        "the probabilities, if given, deserve no trust."
    )
    reason: str | None = Field(None, description="Why it was flagged, or why there is no score.")


class TimingsOut(BaseModel):
    decode_ms: float
    preprocess_ms: float
    queue_ms: float = Field(0.0, description="Waiting in the batcher's queue.")
    inference_ms: float = Field(description="onnxruntime, for the batch this image ran in.")
    batch_size: int = Field(1, description="Images in that onnxruntime call.")
    total_ms: float


class PredictResponse(BaseModel):
    request_id: str
    model: ModelOut
    prediction: PredictionOut
    heatmap: HeatmapOut | None
    roi: RoiOut | None = Field(
        None, description="What was classified, for models trained on ROI crops; else null."
    )
    shape: ShapeOut | None = Field(None, description="Nodule shape (ROI models with a localiser).")
    ood: OodOut | None = Field(None, description="Out-of-distribution check of this image.")
    timings: TimingsOut
    disclaimer: str

    model_config = {
        "json_schema_extra": {
            "example": {
                "request_id": "4f0c9d0c2a7e4c0e9b1b3f0f7d6c1a2b",
                "model": {
                    "name": "thyroid-nodule-classifier",
                    "version": 3,
                    "alias": "champion",
                    "source_run_id": "9a1e...",
                    "onnx_sha256": "e64c...",
                    "provider": "CUDAExecutionProvider",
                },
                "prediction": {
                    "label": "malignant",
                    "probabilities": {"benign": 0.18, "malignant": 0.82},
                    "positive_class": "malignant",
                    "threshold": 0.41,
                    "decision": "malignant",
                },
                "heatmap": {
                    "available": True,
                    "class": "malignant",
                    "format": "png",
                    "width": 560,
                    "height": 360,
                    "data": "iVBORw0KGgo...",
                },
                "ood": {
                    "score": 11.2,
                    "threshold": 14.9,
                    "in_distribution": True,
                    "reason": None,
                },
                "timings": {
                    "decode_ms": 3.1,
                    "preprocess_ms": 4.0,
                    "queue_ms": 0.4,
                    "inference_ms": 9.7,
                    "batch_size": 1,
                    "total_ms": 17.5,
                },
                "disclaimer": DISCLAIMER,
            }
        }
    }


class FrameOut(BaseModel):
    """One frame of a multi-frame request: its own prediction and heatmap."""

    file: int = Field(description="Which uploaded `file` field, from 0.")
    frame: int | None = Field(description="The DICOM frame (1-based); null for still images.")
    prediction: PredictionOut
    heatmap: HeatmapOut | None
    roi: RoiOut | None = None
    shape: ShapeOut | None = None
    ood: OodOut | None = None


class NoduleOut(BaseModel):
    """The nodule the frames show, from all of them (docs/api.md, Several frames)."""

    prediction: PredictionOut
    frames: int = Field(description="How many frames were aggregated.")
    aggregation: str = Field(description="How the frames' probabilities were combined.")
    in_distribution: bool = Field(description="false when any frame was flagged (see ood).")


class MultiFramePredictResponse(BaseModel):
    """The answer to several frames of one nodule: per frame, and for the nodule."""

    request_id: str
    model: ModelOut
    frames: list[FrameOut]
    nodule: NoduleOut
    timings: TimingsOut = Field(description="Summed over the frames (batch_size: the largest).")
    disclaimer: str
