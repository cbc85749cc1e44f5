"""Mapping errors to HTTP responses, in one place.

Every error body has the same shape, `{"error": {"code", "message"}}`, so a
client needs one parser. A PipelineError carries its own status; Starlette's
HTTPException (unknown route, wrong method) is reshaped; a client that hung
up in the middle of its body is logged and answered 499 (nobody reads it);
anything else is a bug, logged with its traceback and answered with a bare 500.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from pipeline import PipelineError, Unavailable

logger = logging.getLogger(__name__)

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "invalid_input", 429: "too_many_requests"}


def error_response(status: int, code: str, message: str, *,
                   headers: dict[str, str] | None = None, **extra: Any) -> Response:
    """The one error body shape."""
    body: dict[str, object] = {"code": code, "message": message, **extra}
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return Response(orjson.dumps({"error": body}), status_code=status,
                    media_type="application/json", headers=headers or None)


async def pipeline_error(request: Request, exc: Exception) -> Response:
    """A PipelineError: its own status, code and message."""
    assert isinstance(exc, PipelineError)
    extra = {"indexes": exc.detail["indexes"][:100]} if "indexes" in exc.detail else {}
    if "index" in exc.detail:
        extra["index"] = exc.detail["index"]
    # A 503 (or 429) says when to come back, so clients wait rather than hammer.
    headers = None
    if "retry_after_s" in exc.detail:
        headers = {"Retry-After": str(int(exc.detail["retry_after_s"]))}
    elif isinstance(exc, Unavailable):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return error_response(exc.status, exc.code, exc.message, headers=headers, **extra)


async def http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (404 route, 405 method) in our shape."""
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def client_gone(request: Request, exc: Exception) -> Response:
    """The client hung up while sending its body: not a bug, and nobody reads the answer."""
    logger.info("client hung up during %s %s", request.method, request.url.path)
    return error_response(499, "client_closed_request", "the client closed the request")


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """A bug: log it, answer 500 without internals."""
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal error; the server log has details")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    PipelineError: pipeline_error,
    HTTPException: http_error,
    ClientDisconnect: client_gone,
    Exception: unexpected_error,
}
