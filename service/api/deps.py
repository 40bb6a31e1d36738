"""Request plumbing shared by the route modules: API-key scopes and the audit record."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from service.config import Settings
from service.errors import ApiError
from service.inference.admission import Ticket
from service.store.keys import GRANTS

# Declares the scheme in the OpenAPI document; authorize() does the checking itself so
# that every failure is the service's own JSON error.
bearer = HTTPBearer(auto_error=False, description="An API key: `thyroid-cad keys create`.")


class _NeedsLookup(Exception):
    """authorize(lookup=False) found no verified key: the database must be asked."""


def authorize(request: Request, scope: str, lookup: bool = True):
    """The caller's API key if it grants `scope` ('predict', 'feedback' or 'admin'; see
    service.store.keys.GRANTS), else 401/403. With `lookup` False it never queries the
    key store (raises _NeedsLookup instead): see check_key.

    Verified keys are remembered for `settings.key_cache_s` (5 minutes by default) so a
    database outage does not lock out clients that were already talking to the service;
    that is also how long a revoked key may keep working on each replica. Checked once
    per request.
    """
    settings: Settings = request.app.state.settings
    if not settings.require_api_key:
        return None
    done = getattr(request.state, "api_key", None)
    if done is not None and done.scope in GRANTS[scope]:
        return done
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("bearer ") or not header[7:].strip():
        raise ApiError(401, "missing_api_key", "send 'Authorization: Bearer <API key>'")
    token = header[7:].strip()
    digest = hashlib.sha256(token.encode()).hexdigest()
    cache = request.app.state.key_cache
    hit = cache.get(digest)
    if hit and time.monotonic() - hit[1] < settings.key_cache_s:
        key = hit[0]
    elif not lookup:
        raise _NeedsLookup
    else:
        try:
            key = request.app.state.keys.verify_key(token)
        except Exception as e:  # the key store is the database; it may be down
            raise ApiError(503, "auth_unavailable", "cannot verify API keys right now") from e
        if key is None:
            raise ApiError(401, "invalid_api_key", "unknown or revoked API key")
        cache[digest] = (key, time.monotonic())
    if key.scope not in GRANTS[scope]:
        needs = "an admin key" if scope == "admin" else f"a {scope} or admin key"
        raise ApiError(403, "forbidden", f"this route needs {needs}")
    request.state.api_key = key
    return key


async def check_key(request: Request, scope: str):
    """authorize() on the event loop where it needs no database (the key was checked
    earlier in this request, or is in the cache: nearly every request), in a thread
    where it does. Each thread hop costs a request tenths of a millisecond."""
    try:
        return authorize(request, scope, lookup=False)
    except _NeedsLookup:
        return await run_in_threadpool(authorize, request, scope)


Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


async def predict_scope(request: Request, _: Bearer):
    return await check_key(request, "predict")


async def admin_scope(request: Request, _: Bearer):
    return await check_key(request, "admin")


async def feedback_scope(request: Request, _: Bearer):
    return await check_key(request, "feedback")


def auth_first(scope: str) -> type[APIRoute]:
    """A route class that checks the API key before the request body is read or parsed.

    FastAPI parses a body (a multipart upload) before it runs dependencies, so without
    this a client with no key would learn about its malformed body before its missing key.
    """

    class AuthFirstRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def route(request: Request):
                await check_key(request, scope)
                return await handler(request)

            return route

    return AuthFirstRoute


async def health_scope(request: Request):
    """Nothing to check when health is public (the default), so probes never wait for a
    thread: with every request thread busy, a liveness probe must still answer."""
    if not request.app.state.settings.public_health:
        await check_key(request, "predict")


def metrics_scope(request: Request):
    if not request.app.state.settings.public_metrics:
        authorize(request, "admin")


PredictKey = Annotated[object, Depends(predict_scope)]
AdminKey = Annotated[object, Depends(admin_scope)]
FeedbackKey = Annotated[object, Depends(feedback_scope)]


# How long an answer waits for its audit record to reach the database or the spool. A
# commit takes milliseconds, so normally every answer's record is stored before the answer
# leaves (a query right after sees it); when the database is slow or locked the answer goes
# anyway and its record lands later (database or spool, never lost).
AUDIT_WAIT_S = 0.5
_DONE: Future[bool] = Future()  # what there is to wait for when nothing was recorded
_DONE.set_result(False)


def pixel_ticket(request: Request) -> contextlib.AbstractContextManager[Ticket]:
    """This request's share of the decoding budget (service/inference/admission.py), for a
    `with` around decoding and everything up to the built answer (the decoded frames live
    until then). Every route that decodes uploads takes from it: /v1 predict and /v2 infer.
    """
    return request.app.state.pixel_budget.held()


class Audited:
    """Collects what the audit record of one predict request needs, and hands it to the
    audit store's writer thread (one non-blocking path for /v1 and /v2).

    Use as a context manager (`with` in a sync handler, `async with` in an async one);
    the handler calls finish(200) on success.
    """

    def __init__(self, request: Request, route: str, key):
        self.request, self.route = request, route
        self.record: dict = {
            "request_id": uuid.uuid4().hex,
            "created_at": datetime.now(UTC),
            "api_key_id": getattr(key, "id", None),
            "route": route,
        }
        self.start = time.perf_counter()
        self.landed: Future[bool] | None = None

    def __enter__(self) -> Audited:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        """A request that raised is recorded too: its ApiError, or a 500."""
        landed = self._finish_raised(exc)
        with contextlib.suppress(TimeoutError):
            landed.exception(timeout=AUDIT_WAIT_S)
        return False

    async def __aenter__(self) -> Audited:
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        """As __exit__, waiting for the record without holding the event loop."""
        landed = asyncio.wrap_future(self._finish_raised(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(landed), AUDIT_WAIT_S)
        return False

    def _finish_raised(self, exc: BaseException | None) -> Future[bool]:
        """The record's future, after finishing it with the error `exc` if it raised."""
        if self.landed is None and isinstance(exc, ApiError):
            self.finish(exc.status, exc.code)
        elif self.landed is None and exc is not None:
            self.finish(500, "internal_error")
        return self.landed or _DONE

    def finish(self, status: int, error_code: str | None = None) -> None:
        """Record the answer (queued: it returns at once) and count it in the metrics."""
        app = self.request.app
        self.record.update(status_code=status, error_code=error_code)
        self.landed = app.state.audit.submit(self.record)
        app.state.stats.request(self.record)
        version = str(self.record.get("model_version") or "none")
        elapsed = time.perf_counter() - self.start
        app.state.metrics.requests.labels(self.route, version, str(status)).inc()
        app.state.metrics.latency.labels(self.route, version).observe(elapsed)
        if error_code:
            app.state.metrics.errors.labels(self.route, error_code).inc()
        if self.record.get("in_distribution") is False:
            app.state.metrics.ood_flagged.labels(version, str(status)).inc()
        if error_code == "overloaded":
            app.state.metrics.rejected.labels(version).inc()
        if "queue_ms" in (self.record.get("timings") or {}):
            queued = self.record["timings"]["queue_ms"] / 1e3
            app.state.metrics.queue_time.labels(version).observe(queued)
