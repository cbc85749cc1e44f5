"""Request bodies: only JSON or NDJSON, and never more bytes than the limit, checked as they arrive.

A POST, PUT or PATCH whose Content-Type is not JSON (`application/json`,
`*+json`) or NDJSON is answered `415` before any route runs, a missing
Content-Type too: a cross-site HTML form or a `no-cors` fetch can only send
`text/plain`, form or multipart bodies, so it can never create a job.

Limits are enforced while the body is read, not from `Content-Length`
alone: a chunked upload (no Content-Length) that passes the limit fails
with `413` at the byte that crosses it, and nothing it sent is queued (the
route's own abort path runs, as for any rejected upload). JSON bodies are
limited to `settings.max_json_bytes` (64 MiB), an NDJSON upload (one job)
to `settings.max_upload_bytes` (1 GiB). The one exception to JSON: `POST /v1/files`
takes `multipart/form-data` (OpenAI's file upload), limited like an NDJSON upload;
a cross-site form cannot use it, as `HostGuard` refuses a foreign Origin first.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_server.http_errors import error_response
from pipeline import PayloadTooLarge, Settings

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/ndjson",
                          "application/json-lines"})
MULTIPART_PATHS = frozenset({"/v1/files"})


def body_kind(content_type: str | None) -> str | None:
    """"json", "ndjson", or None for any other (or no) Content-Type."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind in NDJSON_TYPES:
        return "ndjson"
    if kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        return "json"
    return None


class BodyGuard:
    """415 for untyped bodies, 413 for bodies over the limit (counted as they stream in)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.limits = {"json": settings.max_json_bytes, "ndjson": settings.max_upload_bytes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        kind = body_kind(headers.get("content-type"))
        if kind is None and scope["path"] in MULTIPART_PATHS and headers.get(
                "content-type", "").lower().startswith("multipart/form-data"):
            kind = "ndjson"  # an upload: the upload byte limit
        if kind is None:
            shown = headers.get("content-type")
            reply = error_response(
                415, "unsupported_media_type",
                f"unsupported Content-Type {shown!r}: send application/json, or "
                "application/x-ndjson for line-delimited uploads")
            await reply(scope, receive, send)
            return
        limit = self.limits[kind]
        declared = headers.get("content-length", "")
        if declared.isascii() and declared.isdigit() and int(declared) > limit:
            await error_response(413, "payload_too_large", _too_large(kind, limit))(
                scope, receive, send)
            return
        await self.app(scope, _counting(receive, kind, limit), send)


def _too_large(kind: str, limit: int) -> str:
    if kind == "json":
        return (f"JSON bodies are limited to {limit} bytes; upload large jobs as "
                "application/x-ndjson")
    return f"an NDJSON or file upload is limited to {limit} bytes (EMBEDSTREAM_MAX_UPLOAD_BYTES)"


def _counting(receive: Receive, kind: str, limit: int) -> Receive:
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(_too_large(kind, limit))
        return message

    return counted
