"""What the Python client shares between its sync and async halves.

The wire format (error bodies, SSE framing, base64 vectors), the result
type, option encoding and the reconnect policy live here, so `Client` and
`AsyncClient` differ only in how they wait for I/O. Nothing here imports
the server: the client works against any embedstream over HTTP.

Results are always fetched with `encoding=base64` (little-endian float32):
exact, half the size of JSON floats, and decoded without per-float Python
work.
"""

from __future__ import annotations

import base64
import json
import os
import random
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

import httpx
import numpy as np

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
# Read timeout of an SSE stream: the server pings every 15 s, so a silence
# this long means the connection is dead even if no socket error says so.
STREAM_READ_TIMEOUT_S = 60.0
RETRY_STATUSES = frozenset({409, 429, 502, 503, 504})
NDJSON_PIECE_BYTES = 64 * 1024

Vector = np.ndarray[Any, np.dtype[np.float32]]


class JobStatus(TypedDict, total=False):
    """A job's status object, as `GET /v1/jobs/{id}` answers it (a plain dict)."""

    id: str
    status: str
    total: int
    done: int
    failed: int
    model: str
    dimensions: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    error: str | None


class Progress(TypedDict):
    """A `progress` event of a job's stream."""

    done: int
    failed: int
    total: int


class EmbedstreamError(Exception):
    """An error the server answered (`status`, `code`, `message`), or none at all."""

    def __init__(self, message: str, *, status: int = 0, code: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class ServerUnreachable(EmbedstreamError):
    """No answer from the server (refused, reset, timed out) within the retry budget."""


@dataclass(frozen=True)
class Chunk:
    """One chunk of an input (`chunk_output="chunks"`): `text[start:end]`, its word pieces
    and its float32 vector."""

    start: int
    end: int
    tokens: int
    embedding: Vector


@dataclass(frozen=True)
class Result:
    """One input's result: `embedding` is a float32 row, or None with an `error`.

    With `chunk_output="chunks"`, `chunks` holds the input's chunks in order
    (none for a failed input) and `chunking` says how they were embedded
    (`separate` or `late`); otherwise `chunks` is None, and a pooled chunked
    input's window count is in `extra["chunks"]`, as the server sends it.
    """

    index: int
    id: str | None
    embedding: Vector | None
    truncated: bool = False
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    chunks: tuple[Chunk, ...] | None = None
    chunking: str | None = None


def default_url() -> str:
    """`EMBEDSTREAM_URL`, else the local default."""
    return os.environ.get("EMBEDSTREAM_URL") or DEFAULT_URL


def default_api_key() -> str | None:
    """The first of `EMBEDSTREAM_API_KEYS`, if any."""
    keys = [k.strip() for k in os.environ.get("EMBEDSTREAM_API_KEYS", "").split(",")]
    return next((k for k in keys if k), None)


def headers_for(api_key: str | None) -> dict[str, str]:
    """Request headers that authenticate as `api_key`."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def query_options(options: Mapping[str, object]) -> dict[str, str]:
    """Job options as NDJSON query parameters (None left out, booleans lower case)."""
    params: dict[str, str] = {}
    for name, value in options.items():
        if value is None:
            continue
        params[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return params


def body_options(options: Mapping[str, object]) -> dict[str, object]:
    """Job options as JSON body fields (None left out)."""
    return {name: value for name, value in options.items() if value is not None}


def is_blank(item: object) -> bool:
    """Whether an input is a blank string: a blank line, which a streamed upload skips."""
    return isinstance(item, str) and not item.strip()


def ndjson_line(item: object) -> bytes:
    """One input as an NDJSON line: a string, or an {id, text, metadata} object."""
    return json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def ndjson_pieces(inputs: Iterable[Any]) -> Iterator[bytes]:
    """The inputs as NDJSON in pieces of about 64 KiB, blank strings (blank lines) left out."""
    buffer = bytearray()
    for item in inputs:
        if is_blank(item):
            continue
        buffer += ndjson_line(item)
        if len(buffer) >= NDJSON_PIECE_BYTES:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


async def ndjson_apieces(
    inputs: AsyncIterable[Any] | Iterable[Any]
) -> AsyncIterator[bytes]:
    """As `ndjson_pieces`, from an async iterable too."""
    if not isinstance(inputs, AsyncIterable):
        for piece in ndjson_pieces(inputs):
            yield piece
        return
    buffer = bytearray()
    async for item in inputs:
        if is_blank(item):
            continue
        buffer += ndjson_line(item)
        if len(buffer) >= NDJSON_PIECE_BYTES:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


def raise_for_error(response: httpx.Response) -> None:
    """Raise EmbedstreamError for a non-2xx answer, with the server's code and message."""
    if response.is_success:
        return
    code, message = "http_error", response.reason_phrase or str(response.status_code)
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        pass
    raise EmbedstreamError(f"{response.status_code} {code}: {message}",
                           status=response.status_code, code=code)


def decode_result(row: Mapping[str, Any]) -> Result:
    """A result object from the server (base64 or float embeddings) as a Result."""
    known = {"index", "id", "embedding", "truncated", "error"}
    extra = {k: v for k, v in row.items() if k not in known}
    raw = row.get("embedding")
    embedding = None if raw is None else decode_vector(raw)
    chunks = None
    chunking = None
    if isinstance(extra.get("chunks"), list):  # chunk_output="chunks", not a window count
        chunks = tuple(Chunk(int(c["start"]), int(c["end"]), int(c["tokens"]),
                             decode_vector(c["embedding"])) for c in extra.pop("chunks"))
        chunking = extra.pop("chunking", None)
    return Result(int(row["index"]), row.get("id"), embedding, bool(row.get("truncated")),
                  row.get("error"), extra, chunks, chunking)


def decode_vector(raw: Any) -> Vector:
    """A base64 (little-endian float32) or float list embedding as a float32 row."""
    if isinstance(raw, str):
        return np.frombuffer(base64.b64decode(raw), dtype="<f4").astype(np.float32)
    return np.asarray(raw, dtype=np.float32)


@dataclass(frozen=True)
class ServerEvent:
    """One SSE event: its id (a resume cursor), name and parsed data."""

    id: str | None
    event: str
    data: Any


class EventParser:
    """Turns text/event-stream lines into ServerEvents (comments and pings skipped)."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> ServerEvent | None:
        """Take one line (without its newline); return an event when one is complete."""
        if line == "":
            event = None
            if self._data:
                event = ServerEvent(self._id, self._event, json.loads("\n".join(self._data)))
            self._event, self._data = "message", []
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


class Seen:
    """Indexes already yielded, so a result is never given twice (a bit per index)."""

    def __init__(self) -> None:
        self._bits = bytearray()

    def add(self, index: int) -> bool:
        """Mark `index`; False if it was already marked."""
        byte, bit = divmod(index, 8)
        if byte >= len(self._bits):
            self._bits.extend(bytes(byte + 1 - len(self._bits) + 1024))
        if self._bits[byte] >> bit & 1:
            return False
        self._bits[byte] |= 1 << bit
        return True


class Backoff:
    """Reconnect delays (0.2 s doubling to 5 s, jittered) within a budget of seconds
    without progress; `reset()` on progress."""

    def __init__(self, budget_s: float, first_s: float = 0.2, cap_s: float = 5.0) -> None:
        self.budget_s = budget_s
        self.first_s = first_s
        self.cap_s = cap_s
        self.reset()

    def reset(self) -> None:
        """Progress was made: start again from the shortest delay and the full budget."""
        self.spent_s = 0.0
        self._next_s = self.first_s

    def delays(self) -> Iterator[float]:
        """The next delay, until the budget is spent."""
        while self.spent_s < self.budget_s:
            delay = min(self._next_s, self.cap_s) * random.uniform(0.8, 1.2)
            self._next_s *= 2
            self.spent_s += delay
            yield delay


def retryable(exc: BaseException) -> bool:
    """Whether a failed request may be retried: no answer, or a transient status."""
    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, EmbedstreamError) and exc.status in RETRY_STATUSES


def unreachable(url: str, exc: BaseException) -> ServerUnreachable:
    """The error to raise once the retry budget is spent."""
    if isinstance(exc, EmbedstreamError):
        return ServerUnreachable(f"{url}: {exc.message}", status=exc.status, code=exc.code)
    return ServerUnreachable(f"cannot reach embedstream at {url} ({type(exc).__name__}: "
                             f"{exc}); is `embedstream up` running? (EMBEDSTREAM_URL)")
