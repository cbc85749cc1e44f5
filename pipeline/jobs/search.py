"""Search: cosine similarity over a job's stored vectors, and over a few embedded texts.

`nearest` reads a finished job's vectors a page of chunks at a time and keeps
only the best `top_k`, so a search costs one page of memory whatever the
job's size; `rank` orders a few freshly embedded candidates against their
query (MCP `similarity`). Both skip or refuse failed inputs: a failed
input's stored row is zeros, which has no direction.

The inputs a search hit names are read back from the job's stored inputs
(`read_inputs`); `read_inputs_page` reads them a page at a time, in index
order, for `GET /v1/jobs/{id}/inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from pipeline.errors import InvalidInput, JobNotFinished
from pipeline.inputs import JobOptions
from pipeline.jobs.record import JobStatus
from pipeline.jobs.results import MAX_PAGE, MAX_SCAN_CHUNKS, parse_cursor

if TYPE_CHECKING:
    from pipeline.jobs.record import JobRecord
    from pipeline.jobs.results import ResultRow
    from pipeline.keys import Keys
    from pipeline.store.connections import RedisClient

FloatMatrix = np.ndarray[Any, np.dtype[np.float32]]
IndexArray = np.ndarray[Any, np.dtype[np.int64]]
SEARCH_PAGE_CHUNKS = 64


@dataclass(frozen=True)
class Match:
    """A candidate of `similarity`, its position among the candidates, and its cosine."""

    text: str
    index: int
    score: float


@dataclass(frozen=True)
class StoredInput:
    """A job's input as submitted: its text, and the caller's id and metadata."""

    text: str
    id: str | None
    metadata: dict[str, object] | None


@dataclass(frozen=True)
class InputRow:
    """A job's input at its index."""

    index: int
    input: StoredInput


@dataclass(frozen=True)
class InputsPage:
    """One page of a job's inputs in index order; `next_cursor` is None at the end."""

    inputs: list[InputRow]
    next_cursor: str | None


@dataclass(frozen=True)
class SearchHit:
    """An input of a job near a query: its index, its cosine, and the input (None if expired)."""

    index: int
    score: float
    input: StoredInput | None


def query_options(record: JobRecord) -> JobOptions:
    """How to embed a query to search a job with; JobNotFinished unless the job completed."""
    if record.status is not JobStatus.COMPLETED:
        raise JobNotFinished(f"job {record.id} is {record.status.value}; search_job needs a "
                             "completed job (poll its status first)")
    return JobOptions(dimensions=record.dimensions, model=record.model)


def vectors_of(rows: list[ResultRow]) -> FloatMatrix:
    """The rows' float vectors as one matrix; InvalidInput naming any failed input."""
    failed = [row["index"] for row in rows if row.get("embedding") is None]
    if failed:
        raise InvalidInput(f"inputs {failed} could not be embedded: "
                           f"{rows[failed[0]].get('error')}")
    return np.vstack([np.asarray(row["embedding"], dtype=np.float32) for row in rows])


def rank(query: FloatMatrix, candidates: FloatMatrix, texts: list[str]) -> list[Match]:
    """The candidates by cosine similarity to `query`, best first (ties in input order)."""
    norms = np.linalg.norm(candidates, axis=1) * np.linalg.norm(query)
    scores = (candidates @ query) / np.maximum(norms, 1e-12)
    order = np.argsort(-scores, kind="stable")
    return [Match(texts[i], int(i), float(scores[i])) for i in order]


async def nearest(
    redis: RedisClient, keys: Keys, record: JobRecord,
    query: FloatMatrix, top_k: int,
    *, page_chunks: int = SEARCH_PAGE_CHUNKS,
) -> list[tuple[int, float]]:
    """(index, cosine) of the job's `top_k` vectors nearest to `query`, best first.

    The vectors are read `page_chunks` chunks at a time and only the best
    `top_k` so far are kept, so memory stays bounded by one page whatever the
    job's size (a page of 64 chunks of 32 384-float vectors is 3 MB). Failed
    inputs are left out.
    """
    unit = query / max(float(np.linalg.norm(query)), 1e-12)
    best_index = np.zeros(0, dtype=np.int64)
    best_score = np.zeros(0, dtype=np.float32)
    for first in range(0, record.chunks, page_chunks):
        chunks = range(first, min(first + page_chunks, record.chunks))
        fields = [f for c in chunks for f in (f"v:{c}", f"m:{c}")]
        stored = await redis.hmget(keys.vectors(record.id), fields)
        indexes, scores = _page_scores(chunks, stored, record.chunk_size, unit)
        best_index = np.concatenate([best_index, indexes])
        best_score = np.concatenate([best_score, scores])
        if len(best_score) > top_k:
            keep = np.argpartition(-best_score, top_k - 1)[:top_k]
            best_index, best_score = best_index[keep], best_score[keep]
    order = np.lexsort((best_index, -best_score))
    return [(int(best_index[i]), float(best_score[i])) for i in order]


def _page_scores(
    chunks: range, stored: list[bytes | None], chunk_size: int,
    unit: FloatMatrix,
) -> tuple[IndexArray, FloatMatrix]:
    """Indexes and cosines to `unit` of one page's stored vectors (failed inputs left out)."""
    indexes: list[IndexArray] = []
    scores: list[FloatMatrix] = []
    for offset, chunk in enumerate(chunks):
        vec, meta_raw = stored[2 * offset], stored[2 * offset + 1]
        if vec is None or meta_raw is None:
            continue
        meta = orjson.loads(meta_raw)
        n, dims = int(meta["n"]), int(meta["dims"])  # chunk vectors may follow the rows
        matrix = np.frombuffer(vec, dtype="<f4", count=n * dims).reshape(n, dims)
        failed = {int(k) for k in (meta.get("errors") or {})}
        keep = np.array([i for i in range(len(matrix)) if i not in failed], dtype=np.int64)
        if not len(keep):
            continue
        rows = matrix[keep]
        norms = np.maximum(np.linalg.norm(rows, axis=1), 1e-12)
        scores.append(((rows @ unit) / norms).astype(np.float32))
        indexes.append(chunk * chunk_size + keep)
    if not indexes:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    return np.concatenate(indexes), np.concatenate(scores)


async def read_inputs(
    redis: RedisClient, keys: Keys, job_id: str, indexes: list[int], chunk_size: int
) -> dict[int, StoredInput]:
    """The inputs (text, id, metadata) at some indexes of a job (expired ones left out)."""
    chunks = sorted({i // chunk_size for i in indexes})
    packed = await redis.hmget(keys.inputs(job_id), [str(c) for c in chunks]) if chunks else []
    by_chunk = {c: orjson.loads(p) for c, p in zip(chunks, packed, strict=True) if p}
    found: dict[int, StoredInput] = {}
    for index in indexes:
        data = by_chunk.get(index // chunk_size)
        if data is None:
            continue
        pos = index % chunk_size
        found[index] = StoredInput(data["texts"][pos], data["ids"][pos], data["metadata"][pos])
    return found


async def read_inputs_page(
    redis: RedisClient, keys: Keys, record: JobRecord, cursor: str | None, limit: int
) -> InputsPage:
    """One page of a job's inputs in index order, from `cursor` (a results cursor).

    An input whose chunk has expired or was never written is left out, and
    the page reads on past it (at most `MAX_SCAN_CHUNKS` chunks a page), so a
    page is empty only at the end or past that many missing chunks.
    """
    position = parse_cursor(cursor, record.total)
    limit, size, scanned = max(1, min(limit, MAX_PAGE)), record.chunk_size, 0
    rows: list[InputRow] = []
    while len(rows) < limit and position < record.total and scanned < MAX_SCAN_CHUNKS:
        end = min(position + limit - len(rows), record.total)
        found = await read_inputs(redis, keys, record.id, list(range(position, end)), size)
        rows += [InputRow(index, found[index]) for index in range(position, end)
                 if index in found]
        scanned += (end - 1) // size - position // size + 1
        # A missing chunk is missing whole: go on from the next chunk, not inside this one.
        position = end if end - 1 in found else min(((end - 1) // size + 1) * size, record.total)
    return InputsPage(rows, str(position) if position < record.total else None)


async def search_job(
    redis: RedisClient, keys: Keys, record: JobRecord, query: FloatMatrix, top_k: int
) -> list[SearchHit]:
    """The `top_k` inputs of a job nearest to the `query` vector, best first."""
    hits = await nearest(redis, keys, record, query, top_k)
    inputs = await read_inputs(redis, keys, record.id, [index for index, _ in hits],
                               record.chunk_size)
    return [SearchHit(index, score, inputs.get(index)) for index, score in hits]
