"""The inference service: the FastAPI app factory and its lifespan.

Routes live in service/api/routes/ by audience: v1 (the clinical JSON API), oip (the Open
Inference Protocol, /v2, for standard clients), ops (health, readiness, metrics, the
page for clinicians). No TensorFlow, Keras or training code: the ONNX file and its card
are the contract.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.metrics import Metrics
from service.api.routes import oip, ops, outcomes, v1
from service.config import Settings, get_settings
from service.errors import (
    ApiError,
    api_error_handler,
    http_error_handler,
    unexpected_error_handler,
    validation_error_handler,
)
from service.inference.admission import PixelBudget, return_big_buffers
from service.inference.models import ModelManager
from service.inference.stats import InferenceStats
from service.logs import hold_third_party
from service.schemas import DISCLAIMER

log = logging.getLogger(__name__)


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


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; models and the database are opened in its lifespan."""
    settings = settings or get_settings()
    hold_third_party()  # no UIDs or patient data from libraries' log lines

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # An unreachable registry must fail in seconds, not after minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from service.store.audit import AuditStore
        from service.store.keys import KeyStore
        from service.store.outcomes import OutcomeStore

        audit = AuditStore(settings.audit_url(), settings.audit_spool())
        _migrate_when_possible(audit)
        audit.start_replayer()
        metrics, stats = Metrics(), InferenceStats()

        def on_event(kind: str, **labels) -> None:
            metrics.event(kind, **labels)
            stats.event(kind, **labels)

        manager = ModelManager(
            settings.model,
            settings.extra_aliases,
            settings.runtime(),
            settings.max_loaded_models,
            on_event=on_event,
        )
        manager.start(settings.poll_interval_s)
        app.state.settings, app.state.audit = settings, audit
        app.state.keys = KeyStore(audit.db)
        app.state.outcomes = OutcomeStore(audit.db)
        app.state.metrics, app.state.models, app.state.stats = metrics, manager, stats
        # Memory that cannot run away: a budget of pixels in flight, and freed frames
        # given back (service/inference/admission.py).
        app.state.pixel_budget = PixelBudget(
            settings.decode_pixel_budget, settings.admission_timeout_s
        )
        return_big_buffers()
        app.state.key_cache = {}
        try:
            yield
        finally:
            manager.stop()
            audit.close()

    # Swagger UI and ReDoc from the installed fastapi-offline package, not a CDN.
    app = FastAPIOffline(
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
    routers = (v1.predict, v1.router, outcomes.router, oip.infer_router, oip.router, ops.router)
    for router in routers:
        app.include_router(router)
    return app
