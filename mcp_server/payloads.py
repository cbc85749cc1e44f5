"""Reading requests: JSON bodies, NDJSON streams, query parameters, the caller.

NDJSON uploads are parsed line by line as the bytes arrive, so a
million-line upload is never held whole in memory; a bad line stops the
upload with an error naming the line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.requests import Request

from mcp_server.auth import OWNER
from pipeline.errors import InvalidInput, InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from pipeline.quantize import ENCODINGS
from pipeline.service import Pipeline
from pipeline.settings import Settings

MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_LINE_BYTES = 1024 * 1024
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/ndjson",
                "application/json-lines")


def pipeline_of(request: Request) -> Pipeline:
    """The process's Pipeline (created in the app lifespan)."""
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


def settings_of(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


def owner_of(request: Request) -> str:
    """The API-key owner id of this request ("" without auth)."""
    return str(request.scope.get(OWNER, ""))


def media_type(request: Request) -> str:
    """The request's content type without parameters, lower case."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_ndjson(request: Request) -> bool:
    """Whether the body is newline-delimited JSON."""
    return media_type(request) in NDJSON_TYPES


async def json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object, or a 4xx naming what is wrong with it."""
    kind = media_type(request)
    if kind and kind != "application/json" and not kind.endswith("+json"):
        raise UnsupportedMediaType(f"unsupported Content-Type {kind!r}: send application/json, "
                             "or application/x-ndjson for line-delimited uploads")
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and int(declared) > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"JSON bodies are limited to {MAX_JSON_BYTES} bytes; "
                              "upload large jobs as application/x-ndjson")
    raw = await request.body()
    if len(raw) > MAX_JSON_BYTES:
        raise PayloadTooLarge(f"JSON bodies are limited to {MAX_JSON_BYTES} bytes")
    if not raw.strip():
        raise InvalidRequest("empty body: send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"malformed JSON (or invalid UTF-8): {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object")
    return body


async def ndjson_values(request: Request) -> AsyncIterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line, as the body streams in."""
    pending = b""
    line_no = 0
    async for piece in request.stream():
        pending += piece
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_LINE_BYTES:
            raise PayloadTooLarge(f"line {line_no + len(lines) + 1} is over "
                                  f"{MAX_LINE_BYTES} bytes")
        for line in lines:
            line_no += 1
            if line.strip():
                yield line_no, _parse_line(line, line_no)
    if pending.strip():
        yield line_no + 1, _parse_line(pending, line_no + 1)


def _parse_line(line: bytes, line_no: int) -> Any:
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"line {line_no}: malformed JSON (or invalid UTF-8): {exc}",
                           line=line_no) from None


def query_int(request: Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within [low, high]."""
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    # isascii: str.isdigit() accepts digits such as "²" that int() refuses.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 20 or not low <= int(raw) <= high:
        raise InvalidRequest(f"query parameter '{name}' must be an integer from {low} to {high}")
    return int(raw)


def query_encoding(request: Request) -> str:
    """The `encoding` query parameter: float (default), base64 or a quantized encoding."""
    encoding = request.query_params.get("encoding", "float")
    if encoding not in ENCODINGS:
        raise InvalidRequest(f"query parameter 'encoding' must be one of {', '.join(ENCODINGS)}")
    return encoding
