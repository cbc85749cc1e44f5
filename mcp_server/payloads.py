"""Payloads: reading requests (JSON bodies, NDJSON streams, query parameters, the
caller), and the JSON shapes of what the `Pipeline` returns, one function each.

Every route and tool that shows a job, a page or a match builds it here, so
REST and MCP answer the same shapes.

NDJSON uploads are parsed line by line as the bytes arrive, so a
million-line upload is never held whole in memory; a bad line stops the
upload with an error naming the line. Splitting stays linear however the
bytes arrive: each piece is searched for newlines once, and a partial line
is appended to, never re-split (a client trickling one byte at a time made
`pending += piece; pending.split()` quadratic).

A JSON body is read into one buffer (not Starlette's cached `request.body()`,
which keeps a second copy for the life of the request) and walked once,
in a thread when it is over `THREAD_PARSE_BYTES`: its long list (a job's
`inputs`) is counted there, and decoded a slice at a time only as the
job's writer takes it (`mcp_server.json_lists`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import orjson
from starlette.requests import Request

from mcp_server.auth import caller_of
from mcp_server.body_guard import body_kind
from mcp_server.json_lists import JsonObject, parse_object
from pipeline import (
    InvalidInput,
    InvalidRequest,
    Item,
    PayloadTooLarge,
    Pipeline,
    Settings,
    UnsupportedMediaType,
    parse_item,
)
from pipeline.jobs import (
    Caller,
    InputsPage,
    JobPage,
    JobRecord,
    Match,
    PublicJob,
    ResultRow,
    ResultsPage,
    SearchHit,
    check_encoding,
)

MAX_LINE_BYTES = 1024 * 1024
# Smaller JSON bodies parse inline: a thread hop would cost more than the parse.
THREAD_PARSE_BYTES = 256 * 1024


def pipeline_of(request: Request) -> Pipeline:
    """The process's Pipeline (created in the app lifespan)."""
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


def settings_of(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


def request_caller(request: Request) -> Caller:
    """Who sent this request (set by the auth middleware)."""
    return caller_of(request.scope)


def is_ndjson(request: Request) -> bool:
    """Whether the body is newline-delimited JSON."""
    return body_kind(request.headers.get("content-type")) == "ndjson"


async def json_object(request: Request, list_name: str = "", limit: int = 0) -> JsonObject:
    """The body as a JSON object with its `list_name` list left to decode as it is taken
    (at most `limit` items; see `mcp_server.json_lists`), or a 4xx naming what is wrong."""
    if body_kind(request.headers.get("content-type")) != "json":
        raise UnsupportedMediaType("unsupported Content-Type: send application/json")
    raw = bytearray()
    async for piece in request.stream():  # BodyGuard has counted it against the limit
        raw += piece
    if not raw.strip():
        raise InvalidRequest("empty body: send a JSON object")
    if len(raw) > THREAD_PARSE_BYTES:
        return await asyncio.to_thread(parse_object, raw, list_name, limit)
    return parse_object(raw, list_name, limit)


async def json_body(request: Request) -> dict[str, Any]:
    """A small JSON object body (a sign-in, say), or a 4xx naming what is wrong with it."""
    return (await json_object(request)).fields


class ParsedInputs:
    """A body's inputs as Items, decoded and validated one at a time as they are taken.

    Its length is known before any input is decoded, and it is consumed once.
    """

    def __init__(self, body: JsonObject, *, max_chars: int) -> None:
        self._body = body
        self._count = body.count
        self.max_chars = max_chars

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Item]:
        max_chars = self.max_chars
        for index, raw in enumerate(self._body.elements()):
            yield parse_item(raw, index, max_chars=max_chars)


def parsed_inputs(body: JsonObject, settings: Settings) -> ParsedInputs:
    """A JSON job body's `inputs`, counted against `max_inputs` before any is validated."""
    if not body.listed:
        raise InvalidInput("'inputs' must be a list of strings or {id, text, metadata} "
                           "objects")
    return ParsedInputs(body, max_chars=settings.max_text_chars)


def too_many_inputs(settings: Settings) -> PayloadTooLarge:
    """The 413 for a job body with more than `max_inputs` inputs."""
    return PayloadTooLarge(f"a job holds at most {settings.max_inputs} inputs; this one has "
                           "more (EMBEDSTREAM_MAX_INPUTS)")


class LineSplitter:
    """Splits a byte stream into lines in linear time, however small its pieces."""

    def __init__(self, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_line_bytes = max_line_bytes
        self.lines = 0
        self._pending = bytearray()

    def feed(self, piece: bytes) -> list[bytes]:
        """The lines `piece` completes (without their newline)."""
        pending = self._pending
        search = len(pending)  # only the new bytes can hold a newline
        pending += piece
        start = 0
        lines: list[bytes] = []
        while (end := pending.find(b"\n", search)) != -1:
            lines.append(bytes(pending[start:end]))
            start = search = end + 1
        if start:
            del pending[:start]  # what is left is part of one line
        self.lines += len(lines)
        if len(pending) > self.max_line_bytes:
            raise PayloadTooLarge(f"line {self.lines + 1} is over {self.max_line_bytes} bytes")
        return lines

    def rest(self) -> bytes:
        """The last line, which had no newline."""
        return bytes(self._pending)


async def ndjson_values(request: Request) -> AsyncIterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line, as the body streams in."""
    splitter = LineSplitter()
    async for piece in request.stream():
        first = splitter.lines + 1
        for line_no, line in enumerate(splitter.feed(piece), first):
            if line.strip():
                yield line_no, _parse_line(line, line_no)
    last = splitter.rest()
    if last.strip():
        yield splitter.lines + 1, _parse_line(last, splitter.lines + 1)


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
    return check_encoding(request.query_params.get("encoding"), "query parameter 'encoding'")


def job_json(record: JobRecord) -> PublicJob:
    """A job as every route and tool shows it."""
    return record.public()


def job_page_json(page: JobPage) -> dict[str, object]:
    """`GET /v1/jobs`: one page of jobs and the cursor of the next."""
    return {"jobs": [job_json(record) for record in page.jobs], "next_cursor": page.next_cursor}


def results_json(page: ResultsPage, *, plain: bool = False) -> dict[str, object]:
    """One page of results; `plain` turns numpy vectors into lists of numbers (MCP)."""
    rows = [plain_row(row) for row in page.rows] if plain else page.rows
    return {"results": rows, "next_cursor": page.next_cursor, "backend": page.backend}


def inputs_json(page: InputsPage) -> dict[str, object]:
    """`GET /v1/jobs/{id}/inputs`: one page of inputs in index order (expired ones left out)."""
    inputs = [{"index": row.index, "id": row.input.id, "text": row.input.text,
               "metadata": row.input.metadata} for row in page.inputs]
    return {"inputs": inputs, "next_cursor": page.next_cursor}


def matches_json(matches: list[Match]) -> dict[str, object]:
    """MCP `similarity`: the candidates, best first."""
    return {"matches": [{"text": m.text, "index": m.index, "score": m.score}
                        for m in matches]}


def hits_json(hits: list[SearchHit]) -> dict[str, object]:
    """MCP `search_job`: the nearest inputs, best first (an expired input shows no text)."""
    shown: list[dict[str, object]] = []
    for hit in hits:
        shown.append({"index": hit.index, "score": hit.score})
        if hit.input is not None:
            shown[-1].update(text=hit.input.text, id=hit.input.id, metadata=hit.input.metadata)
    return {"matches": shown}


def plain_row(row: ResultRow) -> ResultRow:
    """A result row with its numpy vectors (its chunks' too) as lists of numbers."""
    plain: ResultRow = orjson.loads(orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY))
    return plain


def json_floats(vectors: np.ndarray[Any, np.dtype[np.float32]]) -> Any:
    """float32 values as Python floats that print in float32's shortest form.

    `tolist()` would print each as the float64 it widens to (0.10000000149011612
    for 0.1), nearly doubling the JSON; these read back to the same float32.
    """
    return orjson.loads(orjson.dumps(np.ascontiguousarray(vectors),
                                     option=orjson.OPT_SERIALIZE_NUMPY))
