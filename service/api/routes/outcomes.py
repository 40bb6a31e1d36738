"""/v1 outcomes and live performance: what biopsies said, and how the answers compare."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError

from service.api.deps import FeedbackKey
from service.api.routes.v1 import TimeQ, _when, errors
from service.errors import ApiError
from service.schemas import DISCLAIMER, SQL_INT_MAX
from service.store import performance
from service.store.outcomes import OutcomeIn, OutcomeOut, UnknownRequest

router = APIRouter(tags=["outcomes"])
RequestId = Annotated[
    str, Path(min_length=1, max_length=64, description="request_id of an earlier answer.")
]
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _store(request: Request):
    return request.app.state.outcomes


@router.post(
    "/v1/requests/{request_id}/outcome",
    response_model=OutcomeOut,
    status_code=201,
    responses={200: {"model": OutcomeOut, "description": "Same as the latest: unchanged."}}
    | errors(400, 401, 403, 404, 422, 503),  # 400: a body that is not JSON at all
)
def record_outcome(request: Request, request_id: RequestId, body: OutcomeIn, key: FeedbackKey):
    """Record the cytology (Bethesda) or histology result of an earlier request (feedback
    or admin key). The same body again changes nothing (200); a different one adds a
    revision (201), the latest counts."""
    if not _ID.fullmatch(request_id):
        raise ApiError(404, "request_not_found", "no audited request with this request_id")
    entered_by = getattr(key, "id", None) or "no-key"
    request.app.state.audit.flush()  # an answer given just now is in the database
    try:
        out, added = _store(request).record(request_id, body, entered_by)
    except UnknownRequest as e:
        raise ApiError(404, "request_not_found", f"no audited request {request_id}") from e
    except SQLAlchemyError as e:
        raise ApiError(503, "audit_unavailable", "the audit database is unreachable") from e
    return JSONResponse(out.model_dump(mode="json"), status_code=201 if added else 200)


@router.get(
    "/v1/requests/{request_id}/outcome",
    responses=errors(401, 403, 404, 503),
)
def outcome_history(request: Request, request_id: RequestId, key: FeedbackKey):
    """Every revision of a request's outcome, oldest first (feedback or admin key)."""
    try:
        history = _store(request).history(request_id)
    except SQLAlchemyError as e:
        raise ApiError(503, "audit_unavailable", "the audit database is unreachable") from e
    if not history:
        raise ApiError(404, "outcome_not_found", f"no outcome recorded for {request_id}")
    return {"request_id": request_id, "revisions": [h.model_dump(mode="json") for h in history]}


@router.get("/v1/performance", responses=errors(400, 401, 403, 404, 422, 503))
def live_performance(
    request: Request,
    key: FeedbackKey,
    model_version: Annotated[
        int | None,
        Query(ge=1, le=SQL_INT_MAX, description="Default: the version the service answers with."),
    ] = None,
    since: TimeQ = None,
):
    """Live AUC, sensitivity and specificity (95% CIs) and ECE over requests with a benign
    or malignant outcome, overall and in / out of distribution (feedback or admin key)."""
    start = _when(since, "since")
    model, _ = request.app.state.models.get(version=model_version)
    request.app.state.audit.flush()  # answers given just now count
    try:
        report = performance.compute(_store(request), model.card, model.name, model.version, start)
    except SQLAlchemyError as e:
        raise ApiError(503, "audit_unavailable", "the audit database is unreachable") from e
    metrics = request.app.state.metrics
    performance.update_gauges(metrics.live, metrics.drift, report)
    return {**report, "disclaimer": DISCLAIMER}
