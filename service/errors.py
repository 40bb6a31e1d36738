"""Domain errors and the one handler that turns them into {"error": {"code", "message"}}."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error a client can act on: HTTP status, a stable code, a readable message."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def _body(request: Request, code: str, message: str) -> dict:
    # The Open Inference Protocol wants {"error": "<message>"}; its clients expect a string.
    if request.url.path.startswith("/v2"):
        return {"error": f"{code}: {message}"}
    return error_body(code, message)


async def api_error_handler(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(
        _body(request, exc.code, exc.message), status_code=exc.status, headers=exc.headers
    )


async def unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not bad input: log it with its traceback, answer JSON without one."""
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(
        _body(request, "internal_error", "internal error; it has been logged"), status_code=500
    )


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
    )
    return JSONResponse(_body(request, "invalid_request", problems), status_code=422)


def _leaves(routes):
    """The routes themselves: FastAPI wraps each included router in one entry that holds it
    as `original_router` (our routers have no prefix, so their paths are the app's)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from _leaves(inner.routes)
        else:
            yield route


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's 405 names only the methods
    of the first route whose path matched, so a path served by two routes (GET and POST
    /v1/requests/{id}/outcome) would advertise one."""
    methods: set[str] = set()
    for route in _leaves(request.app.router.routes):
        match, _ = route.matches(request.scope)
        if match != Match.NONE and getattr(route, "methods", None):
            methods |= route.methods
    return sorted(methods)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request))
    return JSONResponse(
        _body(request, codes.get(exc.status_code, "http_error"), str(exc.detail)),
        status_code=exc.status_code,
        headers=headers or None,
    )
