"""Response models of the /v1 API; they are its OpenAPI schema."""

from __future__ import annotations

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


class PredictionOut(BaseModel):
    label: str = Field(description="Most probable class.")
    probabilities: dict[str, float]
    positive_class: str
    threshold: float = Field(description="Operating point on P(positive class), from validation.")
    decision: str = Field(description="Label at the operating point.")


class HeatmapOut(BaseModel):
    available: bool
    class_name: str | None = Field(None, alias="class")
    format: str | None = None
    width: int | None = None
    height: int | None = None
    data: str | list | None = Field(None, description="base64 PNG, or nested list for array.")
    reason: str | None = None

    model_config = {"populate_by_name": True}


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
