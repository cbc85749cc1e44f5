"""Turning claimed queue entries into chunks to embed, and embedded chunks into results.

The chunks a worker claims together, of one or more jobs, are embedded in
batches of at most `batch_max_texts` texts (`batches`), each in model calls
(`workers.model_calls`, where a failed call is retried text by text, so one
poison input fails alone, as data), then committed (`workers.commits`).
Each chunk is committed on its own (see `pipeline.jobs.results`), so jobs
sharing a batch never wait for each other's bookkeeping.

An input can also kill the process (a segfault in native code, the OOM
killer) instead of raising. So a redelivered chunk, which may have done just
that, is embedded alone and text by text (`embed_attempted`), and before each
text its position is written to `keys.attempt(job, chunk)` (in the job's
slot, with a TTL). If the process dies, the next delivery finds the record,
fails the input it names with a reason and carries on with the others; each
such death names one more input, so a chunk with several of them still ends.
After the last text the record says no attempt is open, so a death later on
(in the commit, say) blames no input. A kill in the instant between one
text's success and the next record would blame that text: the price of one
write per text rather than two. The record names its worker, and a worker
whose heartbeat still lives did not die: it lost Redis (a failover) between
two writes, and its record blames nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from pipeline.jobs import ChunkResult, JobRecord, JobStatus, PieceVectors
from pipeline.model import Embedded, Plan, shape_vectors
from workers.work import Attempt, Entry, Work, chunk_spec, request_work

if TYPE_CHECKING:
    from pipeline import Keys
    from pipeline.model import Embedder
    from pipeline.store import RedisClient
    from workers.cache import Cached, Scoped
    from workers.model_calls import ModelThread

logger = logging.getLogger(__name__)

DIED_ON_IT = ("the worker process died while embedding this input (it was being embedded "
              "alone, after an earlier delivery of its chunk ended the same way)")


FloatMatrix = np.ndarray[Any, np.dtype[np.float32]]
STAGED_WAIT_S = 2.0
STAGED_POLL_S = 0.02


LOST_INPUT = ("this input's chunk was missing from the job's stored inputs when a worker "
              "came to embed it (it expired or was deleted); submit it again")


@dataclass
class Loaded:
    """Claimed entries sorted: work to embed, entries to just ack, and chunks to fail."""

    work: list[Work] = field(default_factory=list)
    skip: list[Entry] = field(default_factory=list)
    # Entries of visible jobs whose chunk of inputs is gone: failed, never silently acked.
    lost: list[tuple[Entry, ChunkResult]] = field(default_factory=list)
    # Read ahead: what the cache held for the work's texts (`ModelCalls.look_up`).
    found: dict[Scoped, Cached] | None = None


async def load_work(redis: RedisClient, keys: Keys, entries: list[Entry]) -> Loaded:
    """Fetch texts and options of claimed entries, and sort them (see `Loaded`).

    An entry of a job still staged (its submitter adds queue entries before it
    makes the job visible) is waited on briefly, then left pending: a worker
    reclaims it later, when the job is queued or gone.
    """
    loaded = Loaded([request_work(e) for e in entries if e.request is not None])
    entries = [e for e in entries if e.request is None]
    if not entries:
        return loaded
    async with redis.pipeline(transaction=False) as pipe:
        for entry in entries:
            pipe.hgetall(keys.job(entry.job_id))
            pipe.hget(keys.inputs(entry.job_id), str(entry.chunk))
        replies = await pipe.execute()
    staged: list[Entry] = []
    for i, entry in enumerate(entries):
        raw, packed = replies[2 * i], replies[2 * i + 1]
        record = JobRecord.from_hash(raw) if raw else None
        if record is not None and record.status is JobStatus.STAGED:
            staged.append(entry)
        elif record is None or record.finished:
            loaded.skip.append(entry)  # job cancelled, finished or expired: nothing to do
        elif packed is None:
            logger.error("chunk %s/%d of a visible job has no inputs: failing it",
                         entry.job_id, entry.chunk)
            loaded.lost.append((entry, lost_result(entry, record)))
        else:
            data = orjson.loads(packed)
            loaded.work.append(Work(
                entry, data["texts"], data["ids"], normalize=record.normalize,
                dimensions=record.output_dimensions, prompt=record.prompt, chunk=record.chunk,
                chunk_overlap=record.chunk_overlap, owner=record.owner,
                spec=chunk_spec(record.chunk_output, record.chunking, record.chunk_tokens,
                                record.chunk_boundary),
                chunking=record.chunking))
    if staged:
        later = await load_work(redis, keys, await _activated(redis, keys, staged))
        loaded.work += later.work
        loaded.skip += later.skip
        loaded.lost += later.lost
    return loaded


def lost_result(entry: Entry, record: JobRecord) -> ChunkResult:
    """A chunk whose inputs are gone: each of its inputs failed, saying so."""
    n = min(record.chunk_size, record.total - entry.chunk * record.chunk_size)
    n = n if n > 0 else entry.size
    return ChunkResult(entry.job_id, entry.chunk, np.zeros((n, record.dimensions), np.float32),
                       [None] * n, [], dict.fromkeys(range(n), LOST_INPUT), 0)


def batches(work: list[Work], max_texts: int) -> list[list[Work]]:
    """Split chunks into batches of at most `max_texts` texts (a chunk is never split)."""
    groups: list[list[Work]] = []
    size = 0
    for item in work:
        if groups and size + len(item.texts) <= max_texts:
            groups[-1].append(item)
            size += len(item.texts)
        else:
            groups.append([item])
            size = len(item.texts)
    return groups


async def _activated(redis: RedisClient, keys: Keys, entries: list[Entry]) -> list[Entry]:
    """The entries whose job stopped being staged within STAGED_WAIT_S (queued or gone)."""
    deadline = time.monotonic() + STAGED_WAIT_S
    while True:
        async with redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.hget(keys.job(entry.job_id), "status")
            statuses = await pipe.execute()
        ready = [e for e, s in zip(entries, statuses, strict=True)
                 if s != JobStatus.STAGED.value.encode()]
        if len(ready) == len(entries):
            return entries
        if time.monotonic() >= deadline:
            logger.info("leaving %d entries of staged jobs for later", len(entries) - len(ready))
            return ready
        await asyncio.sleep(STAGED_POLL_S)


async def embed_attempted(redis: RedisClient, keys: Keys, model: ModelThread, item: Work,
                          ttl_s: int, worker_id: str = "") -> None:
    """Embed a redelivered chunk text by text, recording each attempt before it is made."""
    key = keys.attempt(item.entry.job_id, item.entry.chunk)
    last = Attempt.parse(await redis.get(key))
    if last is not None and last.worker and (
            last.worker == worker_id or await redis.exists(keys.heartbeat(last.worker))):
        last = last.survived()  # its worker lives: it lost Redis mid-chunk, and died on nothing
    given_up = last.suspects if last else frozenset()
    if given_up:
        logger.warning("chunk %s/%d: giving up inputs %s, on which a worker died",
                       item.entry.job_id, item.entry.chunk, sorted(given_up))
    plan = item.planned(model.embedder.info)
    rows: list[tuple[Embedded, FloatMatrix] | None] = []
    for i in range(len(item.texts)):
        if i in given_up:
            item.errors[i] = DIED_ON_IT
            rows.append(None)
            continue
        await redis.set(key, Attempt(i, given_up, worker_id).dump(), ex=ttl_s)
        rows.append(await _embed_one(model, item, plan, i))
    await redis.set(key, Attempt(None, given_up, worker_id).dump(), ex=ttl_s)
    _stack(model.embedder, item, rows)


async def open_attempts(redis: RedisClient, keys: Keys, work: list[Work]) -> list[Work]:
    """The chunks whose last delivery died with an input in hand (so they make progress)."""
    if not work:
        return []
    raw = await asyncio.gather(*(redis.get(keys.attempt(w.entry.job_id, w.entry.chunk))
                                 for w in work))
    records = [Attempt.parse(r) for r in raw]
    return [w for w, r in zip(work, records, strict=True) if r and r.trying is not None]


async def _embed_one(model: ModelThread, item: Work, plan: Plan,
                     i: int) -> tuple[Embedded, FloatMatrix] | None:
    """Input `i` alone: (its pooled vector and token counts, its plan's raw rows)."""
    try:
        alone = plan.part(i)
        embedded = await model.embed_plan(alone)
        vectors, counts, longest = alone.pool(embedded.vectors, embedded.token_counts)
        return Embedded(vectors, np.concatenate([counts, longest])), embedded.vectors
    except Exception as exc:
        logger.exception("input %d of chunk %s/%d failed", i, item.entry.job_id,
                         item.entry.chunk)
        item.errors[i] = f"embedding failed: {type(exc).__name__}: {exc}"[:500]
        return None


def _stack(embedder: Embedder, item: Work,
           rows: list[tuple[Embedded, FloatMatrix] | None]) -> None:
    dims = next((r[0].vectors.shape[1] for r in rows if r is not None),
                embedder.info.dimensions)
    item.vectors = np.vstack([r[0].vectors if r is not None else np.zeros((1, dims), np.float32)
                              for r in rows])
    # Each row's token_counts holds (tokens in all, tokens that count for truncation).
    item.tokens = np.array([int(r[0].token_counts[0]) if r is not None else 0 for r in rows])
    item.longest = np.array([int(r[0].token_counts[1]) if r is not None else 0 for r in rows])
    if item.spec is not None and item.plan is not None:
        item.rows = np.vstack([
            r[1] if r is not None else np.zeros((size, dims), np.float32)
            for r, size in zip(rows, item.plan.sizes, strict=True)])


def chunk_result(item: Work, max_seq_length: int, backend: str = "") -> ChunkResult:
    """Shape an embedded chunk's vectors and flag truncated or failed inputs."""
    assert item.vectors is not None and item.tokens is not None and item.longest is not None
    vectors = shape_vectors(item.vectors, item.dimensions, item.normalize)
    errors = dict(item.errors)
    bad = ~np.isfinite(vectors).all(axis=1)
    for i in np.flatnonzero(bad):
        errors.setdefault(int(i), "the model produced a non-finite vector")
    pieces = piece_vectors(item, errors)
    if errors:
        vectors = vectors.copy()
        vectors[list(errors)] = 0.0
    truncated = [int(i) for i in np.flatnonzero(item.longest > max_seq_length)]
    chunks = item.plan.sizes if item.plan is not None and item.plan.chunked else None
    if pieces is not None:  # the rows' `chunks` are then the chunks themselves
        chunks = None
    return ChunkResult(item.entry.job_id, item.entry.chunk, vectors, item.ids, truncated,
                       errors, int(item.tokens.sum()), chunks, backend, pieces)


def piece_vectors(item: Work, errors: dict[int, str]) -> PieceVectors | None:
    """Each input's chunk vectors, shaped like its own (None without `chunk_output: "chunks"`).

    A failed input keeps no chunks; an input with a non-finite chunk vector fails.
    """
    plan = item.plan
    if item.spec is None or item.rows is None or plan is None:
        return None
    shaped = shape_vectors(item.rows, item.dimensions, item.normalize)
    finite = np.isfinite(shaped).all(axis=1)
    keep: list[FloatMatrix] = []
    spans: list[list[list[int]] | None] = []
    for i, (start, size) in enumerate(zip(plan.starts, plan.sizes, strict=True)):
        if i not in errors and not finite[start:start + size].all():
            errors[i] = "the model produced a non-finite vector for a chunk of this input"
        if i in errors:
            spans.append(None)
            continue
        keep.append(shaped[start:start + size])
        spans.append([[s.start, s.end, s.tokens] for s in plan.spans[start:start + size]])
    matrix = np.vstack(keep) if keep else np.zeros((0, shaped.shape[1]), np.float32)
    return PieceVectors(matrix, spans, item.chunking)


def failed_result(item: Work, reason: str, dims: int) -> ChunkResult:
    """A chunk given up on: every input failed with `reason`."""
    n = len(item.texts)
    return ChunkResult(item.entry.job_id, item.entry.chunk, np.zeros((n, dims), np.float32),
                       item.ids, [], dict.fromkeys(range(n), reason), 0)
