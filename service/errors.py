"""Domain errors and the one handler that turns them into {"error": {"code", "message"}}."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}
    return JSONResponse(
        _body(request, codes.get(exc.status_code, "http_error"), str(exc.detail)),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )
