"""Operations: liveness, readiness, Prometheus metrics, and the page for clinicians."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from prometheus_client import generate_latest

from service.api.deps import health_scope, metrics_scope
from service.api.metrics import Metrics
from service.api.routes.v1 import errors
from service.errors import ApiError
from service.inference.models import ModelManager

STATIC = Path(__file__).resolve().parents[1] / "static"
router = APIRouter(tags=["ops"])


@router.get("/healthz", dependencies=[Depends(health_scope)], responses=errors(401, 403))
async def healthz():
    """Liveness: the process answers (on the event loop itself, no thread, no I/O)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    dependencies=[Depends(health_scope)],
    responses={**errors(401, 403), 503: {"description": "Not ready: no model loaded (same body)."}},
)
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


@router.get(
    "/metrics",
    dependencies=[Depends(metrics_scope)],
    response_class=PlainTextResponse,
    responses={
        200: {
            "description": "Prometheus text exposition format 0.0.4.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **errors(401, 403),
    },
)
def metrics(request: Request):
    """Prometheus metrics."""
    m: Metrics = request.app.state.metrics
    manager: ModelManager = request.app.state.models
    m.registry_up.set(1 if manager.registry_reachable else 0)
    m.from_cache.set(1 if any(x["from_cache"] for x in manager.loaded()) else 0)
    m.spooled.set(request.app.state.audit.spooled())
    return PlainTextResponse(generate_latest(m.registry), media_type="text/plain; version=0.0.4")


@router.get("/favicon.ico", include_in_schema=False)
def favicon():
    """The page's icon (browsers ask for it on every page; a 404 would fill the logs)."""
    return FileResponse(STATIC / "favicon.ico", media_type="image/x-icon")


@router.get("/", include_in_schema=False)
def page():
    index = STATIC / "index.html"
    if not index.is_file():
        raise ApiError(404, "not_found", "the clinician page is not installed")
    return FileResponse(index, media_type="text/html")
