"""The inference service: FastAPI app factory, routes, audit, metrics.

Routes by audience: /v1 (the clinical JSON API), /v2 (Open Inference Protocol for
standard clients), /healthz /readyz /metrics (operations), / (a page for clinicians).
No TensorFlow, Keras or training code: the ONNX file and its card are the contract.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import threading
import time
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import decoding
from service.config import Settings, get_settings
from service.deps import AdminKey, Audited, PredictKey, health_scope, metrics_scope
from service.errors import (
    ApiError,
    api_error_handler,
    http_error_handler,
    unexpected_error_handler,
    validation_error_handler,
)
from service.models import LoadedModel, ModelManager
from thyroid_cad import imaging

log = logging.getLogger(__name__)

DISCLAIMER = (
    "Research software: not for diagnostic use. The probabilities and heatmap support, "
    "and never replace, the judgement of a qualified clinician."
)
STATIC = Path(__file__).parent / "static"
HeatmapMode = Literal["none", "png", "overlay", "array"]


# -- response models (they are the OpenAPI schema) ---------------------------------
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
    inference_ms: float
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
                    "inference_ms": 9.7,
                    "total_ms": 17.5,
                },
                "disclaimer": DISCLAIMER,
            }
        }
    }


# -- metrics ------------------------------------------------------------------------
class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "thyroid_cad_requests",
            "Predict requests.",
            ["route", "model_version", "status"],
            registry=r,
        )
        self.errors = Counter(
            "thyroid_cad_request_errors",
            "Predict requests that failed.",
            ["route", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "thyroid_cad_request_seconds",
            "Predict latency.",
            ["route", "model_version"],
            registry=r,
        )
        self.inference = Histogram(
            "thyroid_cad_inference_seconds",
            "onnxruntime time.",
            ["model_version"],
            registry=r,
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
        )
        self.batch = Histogram(
            "thyroid_cad_batch_size",
            "Images per inference call.",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.loads = Counter("thyroid_cad_model_loads", "Model loads.", ["result"], registry=r)
        self.swaps = Counter("thyroid_cad_model_swaps", "Champion swaps.", registry=r)
        self.registry_up = Gauge(
            "thyroid_cad_registry_reachable", "1 if the registry answered.", registry=r
        )
        self.from_cache = Gauge(
            "thyroid_cad_model_from_cache",
            "1 if the served model came from the local cache.",
            registry=r,
        )
        self.spooled = Gauge(
            "thyroid_cad_audit_spooled", "Audit records waiting for the DB.", registry=r
        )

    def event(self, kind: str, **labels) -> None:
        if kind == "load":
            self.loads.labels(**labels).inc()
        elif kind == "swap":
            self.swaps.inc()


def _migrate_when_possible(audit) -> None:
    """Create or upgrade the audit tables; if the database is down, keep trying in the
    background while requests are served and their records spooled."""
    try:
        audit.migrate()
        return
    except Exception as e:  # noqa: BLE001 - any driver error means "not now"
        log.warning("audit database unavailable at start (%s); records will be spooled", e)

    def retry() -> None:
        while True:
            time.sleep(5)
            try:
                audit.migrate()
                log.info("audit database is back; migrated")
                return
            except Exception:  # noqa: BLE001
                continue

    threading.Thread(target=retry, daemon=True, name="audit-migrate").start()


# -- app ----------------------------------------------------------------------------
def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; models and the database are opened in its lifespan."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # An unreachable registry must fail in seconds, not after minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from service.db import AuditStore

        audit = AuditStore(settings.audit_url(), settings.audit_spool())
        _migrate_when_possible(audit)
        audit.start_replayer()
        metrics = Metrics()
        manager = ModelManager(
            settings.model,
            settings.extra_aliases,
            settings.providers,
            settings.max_loaded_models,
            on_event=metrics.event,
        )
        manager.start(settings.poll_interval_s)
        app.state.settings, app.state.audit = settings, audit
        app.state.metrics, app.state.models = metrics, manager
        app.state.key_cache = {}
        try:
            yield
        finally:
            manager.stop()
            audit.close()

    app = FastAPI(
        title="thyroid-cad inference service",
        version="1",
        description=(
            "Thyroid nodule ultrasound: calibrated class probabilities and Grad-CAM heatmaps "
            "from a versioned model. " + DISCLAIMER
        ),
        lifespan=lifespan,
    )
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unexpected_error_handler)
    _routes(app, settings)
    from service import oip

    oip.add_routes(app, settings)
    return app


# -- predict ------------------------------------------------------------------------
def _colormap(values: np.ndarray) -> np.ndarray:
    """0..1 floats -> RGB uint8 with a perceptually ordered blue-green-yellow-red ramp."""
    stops = np.array(
        [[0, 0, 128], [0, 128, 255], [0, 220, 120], [255, 230, 0], [220, 0, 0]], dtype=np.float64
    )
    x = np.clip(values, 0, 1) * (len(stops) - 1)
    i = np.minimum(np.floor(x).astype(int), len(stops) - 2)
    t = (x - i)[..., None]
    return (stops[i] * (1 - t) + stops[i + 1] * t).astype(np.uint8)


def _png(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode()


def render_heatmap(
    model: LoadedModel,
    heatmap: np.ndarray | None,
    class_index: int,
    mode: str,
    rgb: np.ndarray,
    geometry: imaging.Geometry,
) -> HeatmapOut | None:
    if mode == "none":
        return None
    names = model.card["class_names"]
    if heatmap is None:
        return HeatmapOut(
            available=False,
            reason=model.card.get("heatmap_note") or "this model has no heatmap output",
        )
    raw = heatmap[..., class_index]
    if mode == "array":
        return HeatmapOut(
            available=True,
            class_name=names[class_index],
            format="array",
            width=raw.shape[1],
            height=raw.shape[0],
            data=raw.round(6).tolist(),
        )
    peak = float(raw.max())
    norm = raw / peak if peak > 0 else np.zeros_like(raw)
    square = np.asarray(
        Image.fromarray(norm.astype(np.float32), mode="F").resize(
            (geometry.size, geometry.size), Image.Resampling.BILINEAR
        )
    )
    full = np.clip(imaging.to_original(square, geometry), 0, 1)
    h, w = full.shape
    if mode == "png":
        data = _png((full * 255).round().astype(np.uint8))
    else:  # overlay: the map, coloured, blended where it is strong
        alpha = (0.55 * full)[..., None]
        data = _png((rgb * (1 - alpha) + _colormap(full) * alpha).round().astype(np.uint8))
    return HeatmapOut(
        available=True, class_name=names[class_index], format=mode, width=w, height=h, data=data
    )


def decide(card: dict, probs: np.ndarray) -> PredictionOut:
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


def read_upload(file: UploadFile, limit: int) -> bytes:
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "file_too_large", f"upload exceeds {limit} bytes")
    return data


def predict_upload(
    request: Request,
    file: UploadFile,
    key,
    route: str,
    heatmap: str,
    class_name: str | None,
    alias: str | None = None,
    version: int | None = None,
    name: str | None = None,
) -> JSONResponse:
    with Audited(request, route, key) as audited:
        settings: Settings = request.app.state.settings
        model, via = request.app.state.models.get(alias=alias, version=version, name=name)
        audited.record.update(model_name=model.name, model_version=model.version)
        t0 = time.perf_counter()
        data = read_upload(file, settings.max_upload_bytes)
        audited.record["input_sha256"] = hashlib.sha256(data).hexdigest()
        names = model.card["class_names"]
        if class_name is not None and class_name not in names:  # before any decoding work
            raise ApiError(400, "unknown_class", f"class must be one of {names}")
        decoded = decoding.decode(data, settings.max_image_pixels)
        audited.record.update(
            content_type=decoded.content_type,
            image_height=decoded.rgb.shape[0],
            image_width=decoded.rgb.shape[1],
        )
        t1 = time.perf_counter()
        square, geometry = imaging.prepare_with_geometry(decoded.rgb, model.input_size)
        t2 = time.perf_counter()
        probs, maps = model.run(square[None])
        t3 = time.perf_counter()
        request.app.state.metrics.inference.labels(str(model.version)).observe(t3 - t2)
        request.app.state.metrics.batch.observe(1)
        prediction = decide(model.card, probs[0])
        index = names.index(class_name or prediction.label)
        rendered = render_heatmap(
            model, None if maps is None else maps[0], index, heatmap, decoded.rgb, geometry
        )
        t4 = time.perf_counter()
        timings = TimingsOut(
            decode_ms=(t1 - t0) * 1e3,
            preprocess_ms=(t2 - t1) * 1e3,
            inference_ms=(t3 - t2) * 1e3,
            total_ms=(t4 - audited.start) * 1e3,
        )
        body = PredictResponse(
            request_id=audited.record["request_id"],
            model=ModelOut(
                name=model.name,
                version=model.version,
                alias=via,
                source_run_id=model.card.get("source_run_id"),
                onnx_sha256=model.card["sha256"],
                provider=model.providers[0],
            ),
            prediction=prediction,
            heatmap=rendered,
            timings=timings,
            disclaimer=DISCLAIMER,
        )
        audited.record.update(
            label=prediction.label,
            probabilities=prediction.probabilities,
            timings={k: round(v, 3) for k, v in timings.model_dump().items()},
        )
        audited.finish(200)
        return JSONResponse(
            body.model_dump(by_alias=True), headers={"X-Request-ID": audited.record["request_id"]}
        )


def _routes(app: FastAPI, settings: Settings) -> None:
    heatmap_q = Query("png", description="none, png (grey map), overlay (blended), or array (raw).")
    class_q = Query(
        None, alias="class", description="Heatmap for this class, not the predicted one."
    )

    @app.post("/v1/predict", response_model=PredictResponse, tags=["v1"])
    def predict(
        request: Request,
        key: PredictKey,
        file: Annotated[UploadFile, File(description="PNG, JPEG, BMP, TIFF or DICOM.")],
        heatmap: HeatmapMode = heatmap_q,
        class_name: str | None = class_q,
        alias: str | None = Query(None, description="e.g. challenger"),
    ):
        """Classify one ultrasound image with the champion (or ?alias=) model."""
        return predict_upload(request, file, key, "/v1/predict", heatmap, class_name, alias=alias)

    @app.post("/v1/models/{name}/predict", response_model=PredictResponse, tags=["v1"])
    def predict_alias(
        request: Request,
        name: str,
        key: PredictKey,
        file: Annotated[UploadFile, File()],
        heatmap: HeatmapMode = heatmap_q,
        class_name: str | None = class_q,
        alias: str = Query("champion", description="Registry alias."),
    ):
        """Classify with the version an alias of this model points at."""
        return predict_upload(
            request,
            file,
            key,
            "/v1/models/{name}/predict",
            heatmap,
            class_name,
            alias=alias,
            name=name,
        )

    @app.post(
        "/v1/models/{name}/versions/{version}/predict", response_model=PredictResponse, tags=["v1"]
    )
    def predict_version(
        request: Request,
        name: str,
        version: int,
        key: PredictKey,
        file: Annotated[UploadFile, File()],
        heatmap: HeatmapMode = heatmap_q,
        class_name: str | None = class_q,
    ):
        """Classify with one pinned model version."""
        return predict_upload(
            request,
            file,
            key,
            "/v1/models/{name}/versions/{version}/predict",
            heatmap,
            class_name,
            version=version,
            name=name,
        )

    @app.get("/v1/models", tags=["v1"])
    def models(request: Request, key: PredictKey):
        """Loaded model versions with their cards, provider and status."""
        manager: ModelManager = request.app.state.models
        return {
            "name": manager.name,
            "default_alias": manager.default_alias,
            "registry_reachable": manager.registry_reachable,
            "errors": manager.errors,
            "models": manager.loaded(),
        }

    @app.get("/v1/requests", tags=["admin"])
    def requests(
        request: Request,
        key: AdminKey,
        start: datetime | None = None,
        end: datetime | None = None,
        model_version: int | None = None,
        label: str | None = None,
        limit: int = Query(50, ge=1, le=500),
        offset: int = Query(0, ge=0),
    ):
        """The request audit trail, newest first (admin keys only)."""
        try:
            rows, total = request.app.state.audit.query(
                start, end, model_version, label, limit, offset
            )
        except Exception as e:
            raise ApiError(503, "audit_unavailable", "the audit database is unreachable") from e
        return {"total": total, "limit": limit, "offset": offset, "requests": rows}

    @app.get("/healthz", tags=["ops"], dependencies=[Depends(health_scope)])
    def healthz():
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], dependencies=[Depends(health_scope)])
    def readyz(request: Request):
        """Readiness: a model is loaded (503 otherwise), with where it came from."""
        manager: ModelManager = request.app.state.models
        audit = request.app.state.audit
        loaded = manager.loaded()
        body = {
            "ready": manager.ready,
            "registry_reachable": manager.registry_reachable,
            "serving_from_cache": any(m["from_cache"] for m in loaded),
            "models": [
                {
                    "version": m["version"],
                    "aliases": m["aliases"],
                    "provider": m["provider"],
                    "from_cache": m["from_cache"],
                }
                for m in loaded
            ],
            "audit_database": audit.healthy(),
            "audit_spooled": audit.spooled(),
            "last_error": manager.last_error if not manager.ready else None,
        }
        return JSONResponse(body, status_code=200 if manager.ready else 503)

    @app.get("/metrics", tags=["ops"], dependencies=[Depends(metrics_scope)])
    def metrics(request: Request):
        """Prometheus metrics."""
        m: Metrics = request.app.state.metrics
        manager: ModelManager = request.app.state.models
        m.registry_up.set(1 if manager.registry_reachable else 0)
        m.from_cache.set(1 if any(x["from_cache"] for x in manager.loaded()) else 0)
        m.spooled.set(request.app.state.audit.spooled())
        return Response(generate_latest(m.registry), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def page():
        index = STATIC / "index.html"
        if not index.is_file():
            raise ApiError(404, "not_found", "the clinician page is not installed")
        return FileResponse(index, media_type="text/html")
