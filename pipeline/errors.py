"""The exception tree of embedstream.

    PipelineError                    base; carries a stable `code` and a message
    ├── InvalidRequest               the caller sent something we cannot accept (400/422)
    │   ├── InvalidInput             an input text or option is wrong (422)
    │   ├── InvalidJobId             a job id is malformed (400)
    │   ├── InvalidCursor            a cursor or Last-Event-ID is malformed (400)
    │   └── UnknownModel             no worker or local files serve this model (422)
    ├── Unauthorized                 missing or wrong API key (401)
    ├── JobNotFound                  no such job, or it expired (404)
    ├── NotFound                     no such file or batch, or it expired (404)
    ├── JobNotFinished               the operation needs a finished job (409)
    ├── Conflict                     the same Idempotency-Key is being submitted now (409)
    ├── IdempotencyKeyReused         an Idempotency-Key sent again with another request (422)
    ├── PayloadTooLarge              too many inputs or bytes (413)
    ├── UnsupportedMediaType         a body type we do not read (415)
    ├── Overloaded                   the model's queue is full; retry after `retry_after_s` (429)
    └── Unavailable                  Redis unreachable, or no answer in time (503/504)

The HTTP server maps these to status codes in one place (`mcp_server.errors`),
the MCP tools turn them into tool errors in one place (`mcp_server.tools`).
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """Base of every error embedstream raises on purpose."""

    code = "pipeline_error"
    status = 500

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class InvalidRequest(PipelineError):
    code = "invalid_request"
    status = 400


class InvalidInput(InvalidRequest):
    code = "invalid_input"
    status = 422


class InvalidJobId(InvalidRequest):
    code = "invalid_job_id"
    status = 400


class InvalidCursor(InvalidRequest):
    code = "invalid_cursor"
    status = 400


class UnknownModel(InvalidRequest):
    code = "unknown_model"
    status = 422


class Unauthorized(PipelineError):
    code = "unauthorized"
    status = 401


class JobNotFound(PipelineError):
    code = "job_not_found"
    status = 404


class NotFound(PipelineError):
    code = "not_found"
    status = 404


class JobNotFinished(PipelineError):
    code = "job_not_finished"
    status = 409


class Conflict(PipelineError):
    code = "conflict"
    status = 409


class IdempotencyKeyReused(PipelineError):
    code = "idempotency_key_reused"
    status = 422


class UnsupportedMediaType(PipelineError):
    code = "unsupported_media_type"
    status = 415


class PayloadTooLarge(PipelineError):
    code = "payload_too_large"
    status = 413


class Unavailable(PipelineError):
    """Try again later: `retry_after_s` says when (the HTTP `Retry-After`)."""

    code = "unavailable"
    status = 503

    def __init__(self, message: str, *, retry_after_s: int = 1, **detail: Any) -> None:
        super().__init__(message, **detail)
        self.retry_after_s = retry_after_s


class Overloaded(PipelineError):
    code = "overloaded"
    status = 429
