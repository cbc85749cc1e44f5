"""Results: the idempotent per-chunk commit, and reading results back.

Redelivery from a Redis Streams queue is at-least-once, so exactly-once
results come from the commit (`JobScripts.queue_commit` in `pipeline.jobs`,
home of every script that changes a job): one Lua script writes the chunk's
vectors, its done marker (the `m:<chunk>` field, whose presence means
"done"), the job's counters and the job's `result` event, all or nothing. A redelivered chunk
whose marker is set writes nothing; the worker only acks it. All keys of a
job share one hash slot, so this also holds on Redis Cluster.

Vectors are stored as raw little-endian float32 (`v:<chunk>`, one row per
input, zeros for a failed input) beside a small JSON meta (`m:<chunk>`: ids,
truncated and failed positions, token count). A job with `chunk_output:
"chunks"` stores its inputs' chunk vectors in the same field, after the
input rows (each input's chunks in order, none for a failed input), and each
chunk's `[start, end, tokens]` in the meta (`spans`, with `chunking`): the
one commit writes an input with all its chunks or nothing, and a reader that
wants input rows alone reads the first `n` rows. The job's event stream holds
only references (`chunk`), never a second copy of the vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

import numpy as np
import orjson

from pipeline.errors import InvalidCursor
from pipeline.jobs.quantize import FLOAT, VectorView
from pipeline.jobs.record import JobRecord, load_job

if TYPE_CHECKING:
    from pipeline.keys import Keys
    from pipeline.store.connections import RedisClient

MAX_PAGE = 1000
MAX_SCAN_CHUNKS = 4096


class ResultRow(TypedDict):
    """One input's result: its vector as a view delivers it, or None and the reason it failed."""

    index: int
    id: str | None
    embedding: Any  # a numpy row (float), base64 text or integers; None for a failed input
    truncated: bool
    # Windows embedded, for a job submitted with `chunk: true`; with `chunk_output:
    # "chunks"`, the chunks themselves ({"start", "end", "tokens", "embedding"}).
    chunks: NotRequired[int | list[dict[str, Any]]]
    chunking: NotRequired[str]  # "separate" or "late", with `chunk_output: "chunks"`
    error: NotRequired[str]


@dataclass(frozen=True)
class ResultsPage:
    """One page of a job's results in index order; `next_cursor` is None at the end."""

    rows: list[ResultRow]
    next_cursor: str | None
    backend: str | None  # what embedded the job so far, as its status says


@dataclass(frozen=True)
class ChunkResult:
    """What a worker made of one chunk, ready to commit."""

    job_id: str
    chunk: int
    vectors: np.ndarray[Any, np.dtype[np.float32]]
    ids: list[str | None]
    truncated: list[int]
    errors: dict[int, str]
    tokens: int
    chunks: list[int] | None = None  # windows per input, for a job with `chunk: true`
    backend: str = ""  # what embedded it (the job records it); "" for a chunk given up on
    pieces: PieceVectors | None = None  # with `chunk_output: "chunks"`

    def stored_vectors(self) -> bytes:
        """The `v:<chunk>` field: the input rows, then any chunk vectors (little-endian)."""
        rows = self.vectors.astype("<f4", copy=False).tobytes()
        if self.pieces is None:
            return rows
        return rows + self.pieces.vectors.astype("<f4", copy=False).tobytes()

    def meta(self) -> bytes:
        ids = self.ids if any(i is not None for i in self.ids) else None
        meta: dict[str, object] = {
            "n": len(self.vectors), "dims": int(self.vectors.shape[1]), "ids": ids,
            "truncated": self.truncated, "errors": {str(k): v for k, v in self.errors.items()},
            "tokens": self.tokens,
        }
        if self.chunks is not None:
            meta["chunks"] = self.chunks
        if self.pieces is not None:
            meta["spans"] = self.pieces.spans
            meta["chunking"] = self.pieces.chunking
        return orjson.dumps(meta)


@dataclass(frozen=True)
class PieceVectors:
    """The chunk vectors of a chunk's inputs: a row a chunk, and per input its spans."""

    vectors: np.ndarray[Any, np.dtype[np.float32]]
    # Per input, [start, end, tokens] of each of its chunks (None for a failed input).
    spans: list[list[list[int]] | None]
    chunking: str


def render_rows(
    first_index: int, vectors_raw: bytes, meta_raw: bytes, encoding: str | VectorView = FLOAT
) -> list[ResultRow]:
    """Turn one stored chunk into result objects (`index`, `id`, `embedding`, `truncated`).

    Rows of a job submitted with `chunk: true` also carry `chunks` (windows
    embedded, or with `chunk_output: "chunks"` the chunks and `chunking`).
    """
    meta = orjson.loads(meta_raw)
    n, dims = int(meta["n"]), int(meta["dims"])
    everything = np.frombuffer(vectors_raw, dtype="<f4").reshape(-1, dims)
    ids = meta.get("ids") or [None] * n
    truncated = set(meta.get("truncated") or ())
    errors: dict[str, str] = meta.get("errors") or {}
    chunks: list[int] | None = meta.get("chunks")
    view = as_view(encoding)
    encoded = view.encode(everything[:n])
    pieces = None
    if "spans" in meta:  # chunk vectors follow the input rows
        pieces = _pieces(meta, view.encode(everything[n:]) if len(everything) > n else [])
    rows: list[ResultRow] = []
    for i in range(n):
        row: ResultRow = {"index": first_index + i, "id": ids[i],
                               "embedding": encoded[i], "truncated": i in truncated}
        if chunks is not None:
            row["chunks"] = chunks[i]
        if pieces is not None:
            row["chunks"] = pieces[i]
            row["chunking"] = meta["chunking"]
        if str(i) in errors:
            row["embedding"] = None
            row["error"] = errors[str(i)]
        rows.append(row)
    return rows


def _pieces(meta: dict[str, Any], encoded: Any) -> list[list[dict[str, Any]]]:
    """Each input's chunks as rows show them (an empty list for a failed input)."""
    out: list[list[dict[str, Any]]] = []
    at = 0
    for spans in meta["spans"]:
        mine = []
        for start, end, tokens in spans or ():
            mine.append({"start": start, "end": end, "tokens": tokens,
                         "embedding": encoded[at]})
            at += 1
        out.append(mine)
    return out


def as_view(encoding: str | VectorView) -> VectorView:
    """A view from an encoding name (float or base64; int8/uint8 need a view with ranges)."""
    return encoding if isinstance(encoding, VectorView) else VectorView(encoding)


def parse_cursor(cursor: str | None, total: int) -> int:
    """A results cursor is the next input index, as a decimal string."""
    if cursor is None or cursor == "":
        return 0
    # isascii: str.isdigit() accepts digits such as "²" that int() refuses.
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 20 or int(cursor) > total:
        raise InvalidCursor(f"malformed cursor {cursor[:40]!r}: use the next_cursor of a page")
    return int(cursor)


async def read_page(
    redis: RedisClient, keys: Keys, job_id: str,
    cursor: str | None = None, limit: int = 100, encoding: str | VectorView = FLOAT,
    record: JobRecord | None = None,
) -> ResultsPage:
    """One page of a job's results in index order, from `cursor`.

    While the job runs, a page stops at the first chunk not yet made and its
    `next_cursor` points there. Once the job is finished, chunks never made
    (a cancelled job's) are skipped and the page reads on past them, so it is
    never empty while results remain (at most `MAX_SCAN_CHUNKS` chunks are
    looked at a page). `next_cursor` is null at the end. `backend` is what
    embedded the job so far (as its status says).
    """
    record = record or await load_job(redis, keys, job_id)
    total, chunk_size = record.total, record.chunk_size
    page = _Page(parse_cursor(cursor, total), max(1, min(limit, MAX_PAGE)), total, chunk_size,
                 record.finished)
    while page.open and page.scanned < MAX_SCAN_CHUNKS:
        first = page.position // chunk_size
        last = (min(page.position + page.room, total) - 1) // chunk_size
        fields = [f for c in range(first, last + 1) for f in (f"v:{c}", f"m:{c}")]
        stored = await redis.hmget(keys.vectors(job_id), fields)
        page.scanned += last - first + 1
        for offset, chunk in enumerate(range(first, last + 1)):
            if not page.take(chunk, stored[2 * offset], stored[2 * offset + 1], encoding):
                break
    more = page.position < total
    return ResultsPage(page.rows, str(page.position) if more else None, record.backend or None)


@dataclass
class _Page:
    """A results page being filled, chunk by chunk, from `position`."""

    position: int
    limit: int
    total: int
    chunk_size: int
    finished: bool
    rows: list[ResultRow] = field(default_factory=list)
    scanned: int = 0
    stalled: bool = False

    @property
    def room(self) -> int:
        return self.limit - len(self.rows)

    @property
    def open(self) -> bool:
        return not self.stalled and self.room > 0 and self.position < self.total

    def take(self, chunk: int, vec: bytes | None, meta: bytes | None,
             encoding: str | VectorView) -> bool:
        """Add one stored chunk's rows (or skip a missing one); False to stop this batch."""
        if vec is None or meta is None:
            if not self.finished:  # not made yet: the page ends here
                self.stalled = True
                return False
            self.position = min((chunk + 1) * self.chunk_size, self.total)
            return True
        low = max(self.position, chunk * self.chunk_size)
        high = min((chunk + 1) * self.chunk_size, self.total, low + self.room)
        self.rows.extend(r for r in render_rows(chunk * self.chunk_size, vec, meta, encoding)
                         if low <= r["index"] < high)
        self.position = high
        return self.room > 0


async def read_chunk_rows(
    redis: RedisClient, keys: Keys, job_id: str, chunk: int, chunk_size: int,
    encoding: str | VectorView = FLOAT,
) -> list[ResultRow]:
    """The results of one committed chunk (empty if it has expired)."""
    vec, meta = await redis.hmget(keys.vectors(job_id), [f"v:{chunk}", f"m:{chunk}"])
    if vec is None or meta is None:
        return []
    return render_rows(chunk * chunk_size, vec, meta, encoding)
