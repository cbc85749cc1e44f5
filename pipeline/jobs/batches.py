"""Batches: OpenAI's Batch API for `/v1/embeddings`, where a batch is one of our jobs.

A batch's input file holds one request a line (`{"custom_id", "method":
"POST", "url": "/v1/embeddings", "body": {...}}`); the texts of every
request become the inputs of one job, in file order, each with its request's
`custom_id` as its id. So a batch is durable, resumable, on the dashboard and
the feed, and owned by the key that made it, like any job.

Kept beside the job, under the batch's own hash tag (`{batch_<hex>}`):

- `keys.batch(id)`: what the client asked (input file, endpoint, window,
  metadata), the job's id, and the batch's `state`: `validating` while its
  file is checked and its job written, `failed` when the file was refused
  (with OpenAI-shaped `errors`), `submitted` once its job is queued;
- `keys.batch_requests(id)`: the request map, part number -> up to
  `REQUESTS_PER_PART` rows of (custom_id, first input index, inputs), so a
  request whose `input` is a list maps to a range of the job's inputs.

Creation checks every line first (`validate`, with
`pipeline.jobs.batch_lines`; nothing written but the record), then writes
the job from a second pass over the file (`items`), which also writes the
request map; both passes read the file a part at a time.

The batch's status is derived from its job on every read (`Batches.state`),
never stored twice. Output and error files are not stored either: their
lines are made from the job's results, a page at a time, as they are read
(`Batches.outcomes`). Their ids are derived from the batch's.

Oddities, on purpose:

- the record is written before the job, and the job's id into it before the
  job becomes visible, so a server that dies mid-creation leaves either a
  batch whose job runs (shown `in_progress`) or one still `validating`
  whose heartbeat (`alive_at`) stops: after `staging_ttl_s` it reads `failed`;
- a batch whose job's results have expired reads `expired`; so does one
  whose job made no progress within its timeout (`batch_expired`);
- cancelling is immediate (our cancel is): a cancelled batch never shows
  `cancelling`, and `finalizing` never shows, as output is made as it is read.
"""

from __future__ import annotations

import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.errors import Conflict, InvalidCursor, InvalidRequest, JobNotFound, NotFound
from pipeline.inputs import Item
from pipeline.jobs.batch_lines import (
    COMPLETION_WINDOWS,
    ENDPOINT,
    MAX_LINE_BYTES,
    BatchError,
    LineError,
    Validation,
    check_line,
)
from pipeline.jobs.files import Files, StoredFile
from pipeline.jobs.quantize import VectorView
from pipeline.jobs.record import JobRecord, JobStatus, load_job
from pipeline.jobs.results import MAX_PAGE, ResultRow, read_page
from pipeline.jobs.tenants import Caller, visible
from pipeline.store.connections import outage_is_unavailable, redis_outage, text_of

if TYPE_CHECKING:
    from pipeline.keys import Keys
    from pipeline.settings import Settings
    from pipeline.store.connections import RedisClient

BATCH_ID = re.compile(r"^batch_([0-9a-f]{32})$")
OUTPUT_FILE_ID = re.compile(r"^file-([0-9a-f]{32})-(output|errors)$")
WINDOW_S = 24 * 3600
MAX_REPORTED_ERRORS = 100
REQUESTS_PER_PART = 1000
VALIDATING, FAILED, SUBMITTED = "validating", "failed", "submitted"


@dataclass(frozen=True)
class BatchRecord:
    """The batch hash, typed."""

    id: str
    owner: str
    input_file_id: str
    endpoint: str
    completion_window: str
    created_at: int
    state: str = VALIDATING
    metadata: dict[str, str] | None = None
    job: str = ""
    requests: int = 0
    inputs: int = 0
    encoding: str = "float"
    errors: tuple[BatchError, ...] = ()
    failed_at: int | None = None
    alive_at: float = 0.0
    counts: tuple[int, int] | None = None  # (completed, failed), once counted after the end
    deleted: frozenset[str] = frozenset()  # "output", "errors": files the client deleted
    sizes: dict[str, int] = field(default_factory=dict)  # bytes of "output", "errors", once read

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> BatchRecord:
        """Parse HGETALL of the batch hash (which must not be empty)."""
        f = {text_of(k): text_of(v) for k, v in raw.items()}
        counts = orjson.loads(f["counts"]) if "counts" in f else None
        which = ("output", "errors")
        return cls(
            id=f["id"], owner=f["owner"], input_file_id=f["input_file_id"],
            endpoint=f["endpoint"], completion_window=f["completion_window"],
            created_at=int(f["created_at"]), state=f["state"],
            metadata=orjson.loads(f.get("metadata", "null")), job=f.get("job", ""),
            requests=int(f.get("requests", 0)), inputs=int(f.get("inputs", 0)),
            encoding=f.get("encoding", "float"),
            errors=tuple(BatchError(**e) for e in orjson.loads(f.get("errors", "[]"))),
            failed_at=int(f["failed_at"]) if "failed_at" in f else None,
            alive_at=float(f.get("alive_at", f["created_at"])),
            counts=(int(counts[0]), int(counts[1])) if counts else None,
            deleted=frozenset(x for x in which if f"deleted_{x}" in f),
            sizes={x: int(f[f"bytes_{x}"]) for x in which if f"bytes_{x}" in f})

    def fields(self) -> dict[str, str | int | float]:
        """The fields written when the batch is opened."""
        return {"id": self.id, "owner": self.owner, "input_file_id": self.input_file_id,
                "endpoint": self.endpoint, "completion_window": self.completion_window,
                "created_at": self.created_at, "state": self.state, "alive_at": time.time(),
                "metadata": orjson.dumps(self.metadata).decode()}

    @property
    def hex(self) -> str:
        return self.id.removeprefix("batch_")


@dataclass(frozen=True)
class RequestCounts:
    total: int
    completed: int
    failed: int


@dataclass(frozen=True)
class BatchState:
    """A batch as OpenAI's Batch object shows it, derived from its record and its job."""

    record: BatchRecord
    status: str
    counts: RequestCounts
    errors: tuple[BatchError, ...] = ()
    model: str | None = None
    times: dict[str, int | None] = field(default_factory=dict)  # in_progress_at, completed_at...
    output_file_id: str | None = None
    error_file_id: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "expired", "cancelled")


@dataclass(frozen=True)
class RequestOutcome:
    """One request's results: `rows` when every input was embedded, else why not."""

    number: int  # its place among the file's requests, from 0
    custom_id: str
    rows: list[ResultRow]
    error: str | None  # the first failed input's reason
    missing: bool  # some input never embedded (cancelled, expired)


@dataclass(frozen=True)
class BatchPage:
    batches: list[BatchState]
    has_more: bool


def new_batch_id() -> str:
    """A fresh, unguessable batch id in OpenAI's shape."""
    return f"batch_{uuid.uuid4().hex}"


def output_file_ids(batch_id: str) -> tuple[str, str]:
    """The ids of a batch's output and error files."""
    hex_id = batch_id.removeprefix("batch_")
    return f"file-{hex_id}-output", f"file-{hex_id}-errors"


def _unix(iso: str | None) -> int | None:
    return int(datetime.fromisoformat(iso).timestamp()) if iso else None


class Batches:
    """Open, validate, submit, describe and read the outcomes of batches."""

    def __init__(self, redis: RedisClient, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.files = Files(redis, keys, settings)

    @property
    def ttl_s(self) -> int:
        """How long a batch's keys live: as long as its job may wait, then its results."""
        return int(self.settings.result_ttl_s + self.settings.job_timeout_s)

    @outage_is_unavailable
    async def open(self, owner: str, stored: StoredFile, metadata: dict[str, str] | None
                   ) -> BatchRecord:
        """Write a `validating` batch, then list it (a listed batch always has its record)."""
        record = BatchRecord(new_batch_id(), owner, stored.id, ENDPOINT, COMPLETION_WINDOWS[0],
                             int(time.time()), metadata=metadata)
        await self._write(record.id, record.fields(), expire=True)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self.keys.batches(owner), {record.id: time.time_ns() // 1000})
            pipe.expire(self.keys.batches(owner), self.ttl_s)
            await pipe.execute()
        return record

    async def _write(self, batch_id: str, fields: Mapping[str, str | bytes | int | float], *,
                     expire: bool = False) -> None:
        """Set fields of the batch hash at once (and its TTL, when it is new)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            for name, value in fields.items():
                pipe.hset(self.keys.batch(batch_id), name, value)
            if expire:
                pipe.expire(self.keys.batch(batch_id), self.ttl_s)
            await pipe.execute()

    @outage_is_unavailable
    async def validate(self, record: BatchRecord, stored: StoredFile) -> Validation:
        """The first pass over the input file: every line checked, nothing written."""
        validation = Validation()
        limits = {"max_chars": self.settings.max_text_chars,
                  "max_texts": self.settings.embed_max_texts * 4}
        async for number, data in self.files.lines(stored, MAX_LINE_BYTES):
            if number % REQUESTS_PER_PART == 0:
                await self._beat(record.id)
            if data is not None and not data.strip():
                continue
            try:
                validation.add(number, check_line(data, **limits), self.settings.max_inputs)
            except LineError as exc:
                validation.errors.append(BatchError(exc.code, exc.message, number, exc.param))
                if len(validation.errors) >= MAX_REPORTED_ERRORS:
                    break
        if not validation.requests and not validation.errors:
            validation.errors.append(BatchError("empty_file", "The input file has no requests."))
        return validation

    async def _beat(self, batch_id: str) -> None:
        """Say the batch's creation is still alive (see the module docstring)."""
        await self._write(batch_id, {"alive_at": time.time()})

    @outage_is_unavailable
    async def fail(self, record: BatchRecord, errors: list[BatchError]) -> BatchRecord:
        """Mark a batch whose file was refused `failed`, with the reasons."""
        failed = replace(record, state=FAILED, errors=tuple(errors), failed_at=int(time.time()))
        await self._write(record.id, {
            "state": FAILED, "failed_at": failed.failed_at or 0,
            "errors": orjson.dumps([e.__dict__ for e in errors]).decode()})
        return failed

    @outage_is_unavailable
    async def bind(self, record: BatchRecord, validation: Validation, job_id: str
                   ) -> BatchRecord:
        """Name the batch's job before it becomes visible (see the module docstring)."""
        bound = replace(record, job=job_id, requests=validation.requests,
                        inputs=validation.inputs, encoding=validation.encoding)
        await self._write(record.id, {
            "job": job_id, "requests": bound.requests, "inputs": bound.inputs,
            "encoding": bound.encoding})
        return bound

    async def items(self, record: BatchRecord, stored: StoredFile) -> AsyncIterator[Item]:
        """The second pass: every request's texts as the job's inputs, its rows in the map."""
        limits = {"max_chars": self.settings.max_text_chars,
                  "max_texts": self.settings.embed_max_texts * 4}
        rows: list[tuple[str, int, int]] = []
        parts = start = 0
        async for _, data in self.files.lines(stored, MAX_LINE_BYTES):
            if data is None or not data.strip():
                continue
            try:
                request = check_line(data, **limits)
            except LineError as exc:  # only if the file changed since the first pass
                raise InvalidRequest(f"the input file changed while the batch was created: "
                                     f"{exc.message}") from None
            rows.append((request.custom_id, start, len(request.texts)))
            start += len(request.texts)
            for text in request.texts:
                yield Item(text, request.custom_id)
            if len(rows) == REQUESTS_PER_PART:
                await self._write_rows(record.id, parts, rows)
                parts, rows = parts + 1, []
        if rows:
            await self._write_rows(record.id, parts, rows)

    async def _write_rows(self, batch_id: str, part: int, rows: list[tuple[str, int, int]]
                          ) -> None:
        with redis_outage():
            async with self.redis.pipeline(transaction=True) as pipe:  # the batch's slot
                pipe.hset(self.keys.batch_requests(batch_id), str(part), orjson.dumps(rows))
                pipe.expire(self.keys.batch_requests(batch_id), self.ttl_s)
                pipe.hset(self.keys.batch(batch_id), "alive_at", time.time())
                await pipe.execute()

    @outage_is_unavailable
    async def submitted(self, record: BatchRecord) -> BatchRecord:
        """The batch's job is queued."""
        await self._write(record.id, {"state": SUBMITTED})
        return replace(record, state=SUBMITTED)

    @outage_is_unavailable
    async def discard(self, record: BatchRecord) -> None:
        """Forget a batch whose job was refused (the client is told why, and may retry)."""
        await self.redis.delete(self.keys.batch(record.id), self.keys.batch_requests(record.id))
        await self.redis.zrem(self.keys.batches(record.owner), record.id)

    @outage_is_unavailable
    async def get(self, batch_id: str, caller: Caller) -> BatchRecord:
        """The batch `caller` may see; NotFound for anyone else's, or an expired one."""
        raw = await self.redis.hgetall(self.keys.batch(batch_id)) if BATCH_ID.fullmatch(
            batch_id) else None
        record = BatchRecord.from_hash(raw) if raw else None
        if record is None or not visible(record.owner, caller):
            raise NotFound(f"batch {batch_id[:80]!r} does not exist or has expired")
        return record

    @outage_is_unavailable
    async def job(self, record: BatchRecord) -> JobRecord | None:
        """The batch's job, or None before it is visible and after it expired."""
        if not record.job:
            return None
        try:
            job = await load_job(self.redis, self.keys, record.job)
        except JobNotFound:
            return None
        if not job.finished:  # keep the batch as long as its running job may live
            async with self.redis.pipeline(transaction=True) as pipe:  # the batch's slot
                pipe.expire(self.keys.batch(record.id), self.ttl_s)
                pipe.expire(self.keys.batch_requests(record.id), self.ttl_s)
                await pipe.execute()
        return job

    @outage_is_unavailable
    async def state(self, record: BatchRecord) -> BatchState:
        """The batch as OpenAI shows it (status from its job, counts, file ids)."""
        job = await self.job(record)
        if job is None:
            return self._without_job(record)
        status, errors = _status_of(job)
        counts = await self._counts(record, job)
        times = {"in_progress_at": _unix(job.created_at)}
        finished = _unix(job.finished_at)
        times.update({"completed": {"completed_at": finished, "finalizing_at": finished},
                      "expired": {"expired_at": finished},
                      "cancelled": {"cancelling_at": finished, "cancelled_at": finished},
                      }.get(status, {}))
        state = BatchState(record, status, counts, errors, job.model, times)
        return self._with_files(state) if state.finished else state

    def _without_job(self, record: BatchRecord) -> BatchState:
        counts = RequestCounts(record.requests, 0, 0)
        if record.state == FAILED:
            return BatchState(record, "failed", counts, record.errors,
                              times={"failed_at": record.failed_at})
        if record.state == VALIDATING and time.time() - record.alive_at <= \
                self.settings.staging_ttl_s:
            return BatchState(record, "validating", counts)
        if record.state == VALIDATING:
            reason = BatchError("validation_interrupted", "the server creating this batch "
                                "stopped before its job was queued; create it again")
            return BatchState(record, "failed", counts, (reason,),
                              times={"failed_at": int(record.alive_at)})
        gone = BatchError("batch_expired", "the batch's results have expired")
        return BatchState(record, "expired", counts, (gone,))

    def _with_files(self, state: BatchState) -> BatchState:
        """A finished batch with the output and error file ids it has."""
        output, errors = output_file_ids(state.record.id)
        counts, deleted = state.counts, state.record.deleted
        unrun = counts.total - counts.completed - counts.failed
        return replace(
            state, output_file_id=output if counts.completed and "output" not in deleted
            else None,
            error_file_id=errors if (counts.failed or unrun) and "errors" not in deleted
            else None)

    async def _counts(self, record: BatchRecord, job: JobRecord) -> RequestCounts:
        """Requests completed and failed: the job's counters when each request has one
        input; else counted once the job ends (and kept), estimated while it runs."""
        total = record.requests
        if record.inputs == record.requests:
            return RequestCounts(total, job.done, job.failed)
        if record.counts is not None:
            return RequestCounts(total, *record.counts)
        if not job.finished:
            scale = total / max(record.inputs, 1)
            return RequestCounts(total, int(job.done * scale), int(job.failed * scale))
        completed = failed = 0
        async for outcome in self.outcomes(record, job, "float"):
            completed += not outcome.error and not outcome.missing
            failed += outcome.error is not None
        await self._write(record.id, {"counts": orjson.dumps([completed, failed])})
        return RequestCounts(total, completed, failed)

    async def outcomes(self, record: BatchRecord, job: JobRecord, view: str | VectorView
                       ) -> AsyncIterator[RequestOutcome]:
        """Every request's results in file order, read a page of results at a time."""
        rows: deque[ResultRow] = deque()
        cursor: str | None = "0"
        number = 0
        async for part in self._request_rows(record):
            for custom_id, start, count in part:
                end = start + count
                while cursor is not None and int(cursor) < end:
                    with redis_outage():
                        page = await read_page(self.redis, self.keys, job.id, cursor, MAX_PAGE,
                                               view, job)
                    rows.extend(page.rows)
                    cursor = page.next_cursor
                while rows and rows[0]["index"] < start:
                    rows.popleft()
                mine = [rows.popleft() for _ in range(count) if rows and rows[0]["index"] < end]
                error = next((row.get("error") for row in mine if "error" in row), None)
                yield RequestOutcome(number, custom_id, mine, error, len(mine) < count)
                number += 1

    async def _request_rows(self, record: BatchRecord) -> AsyncIterator[list[list[Any]]]:
        part = 0
        while part * REQUESTS_PER_PART < record.requests:
            with redis_outage():
                raw = await self.redis.hget(self.keys.batch_requests(record.id), str(part))
            if raw is None:
                raise NotFound(f"batch {record.id}'s request map has expired")
            yield orjson.loads(raw)
            part += 1

    @outage_is_unavailable
    async def forget_file(self, record: BatchRecord, which: str) -> None:
        """Delete an output or error file: the batch no longer names it."""
        await self._write(record.id, {f"deleted_{which}": 1})

    @outage_is_unavailable
    async def keep_size(self, record: BatchRecord, which: str, size: int) -> None:
        """Remember the size of a finished batch's output or error file (it never changes)."""
        await self._write(record.id, {f"bytes_{which}": size})

    @outage_is_unavailable
    async def list(self, caller: Caller, *, after: str | None = None, limit: int = 20
                   ) -> BatchPage:
        """The caller's own batches, newest first, one page after the batch id `after`."""
        index = self.keys.batches(caller.owner)
        top = "+inf"
        if after:
            score = await self.redis.zscore(index, after)
            if score is None:
                raise InvalidCursor(f"'after' names no batch of this key: {after[:80]!r}")
            top = str(int(score))
        states: list[BatchState] = []
        offset = 0
        while len(states) <= limit:
            entries = await self.redis.zrange(index, top, "-inf", desc=True, byscore=True,
                                              withscores=True, offset=offset, num=limit + 1)
            if not entries:
                break
            offset += len(entries)
            for member, score in entries:
                batch_id = text_of(member)
                # Same-score ids come in descending order; those at or above `after` were sent.
                if after and int(score) == int(float(top)) and batch_id >= after:
                    continue
                try:
                    states.append(await self.state(await self.get(batch_id, caller)))
                except NotFound:  # expired: unlisted, and the next ids move up one
                    await self.redis.zrem(index, batch_id)
                    offset -= 1
        return BatchPage(states[:limit], len(states) > limit)

def check_cancellable(state: BatchState) -> None:
    """A batch can be cancelled once its job is queued (cancelling an ended one does nothing)."""
    if state.status == "validating":
        raise Conflict(f"batch {state.record.id} is still validating; cancel it once it is "
                       "in_progress")


def _status_of(job: JobRecord) -> tuple[str, tuple[BatchError, ...]]:
    """The OpenAI status of a batch whose job is `job`, and the errors it shows."""
    if job.status in (JobStatus.QUEUED, JobStatus.RUNNING):
        return "in_progress", ()
    if job.status is JobStatus.CANCELLED:
        return "cancelled", ()
    if job.status is JobStatus.FAILED and job.done + job.failed < job.total:
        return "expired", (BatchError("batch_expired", job.error or "the job timed out"),)
    return "completed", ()  # completed, or every input failed (each request in the error file)
