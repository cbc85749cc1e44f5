"""Submission: staging a job's inputs and record, queueing it, then making it visible.

A job is wholly queued or never seen. The steps, each safe to die after:

1. inputs are written chunk by chunk as they arrive (`JobWriter.add`), under
   `staging_ttl_s`, refreshed with every chunk and, while the upload is alive,
   every third of it (`JobWriter.keep`, from the submitter's renewal task), so
   a producer that pauses loses nothing while an upload that dies leaves keys
   that expire by themselves;
2. after every input passed validation, the job is listed in its owner's and
   the global job lists (`pipeline.jobs.index`), its record is written as
   `staged` (same TTL), unless a chunk of its inputs is gone (then the
   submission is refused, to be retried), and the job is added to the
   active-jobs index (global
   keys, so before the job can be seen; readers and the janitor prune entries
   whose job is gone, and `abort` unlists a job that never became visible);
3. its queue entries are added (`XADD`, in batches, refreshing the TTLs); a
   worker that reads one while the job is still staged leaves it for later;
4. `activate`, one script in the job's slot, makes it `queued` with its long
   TTLs, only if every chunk of its inputs is there (else the submission is
   refused: a visible job never lacks an input): from here on readers see
   it, and workers embed it;
5. the Idempotency-Key is bound to it, and `job.created` is announced (once,
   by whoever gets there first: the submitter or the janitor); both are the
   `Submitter`'s (`pipeline.jobs.submitter`).

A submitter that dies before 4 leaves nothing visible: its staged keys
expire, its queue entries are acked by the workers that find the job gone,
its Idempotency-Key lease lapses within `idempotency_lease_s` and a retry
makes a new job. One that dies after 4 leaves a job that completes; a retry
with its key finds the job (the lapsed lease names it) and binds it.

Small jobs (at most `fast_lane_max_texts` inputs) go to the fast lane, which
workers read before the bulk lane, so a single query never waits behind a
million-line upload.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from pipeline import tracing
from pipeline.errors import InvalidInput, PayloadTooLarge, Unavailable
from pipeline.jobs import index as job_index
from pipeline.jobs.idempotency import RequestDigest
from pipeline.jobs.record import JobRecord, JobStatus, new_job_id, now_iso
from pipeline.jobs.scripts import Activation, JobScripts
from pipeline.model import tokens
from pipeline.model.prompts import resolve_prompt, with_prompt
from pipeline.model.windows import check_windows

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pipeline.inputs import Item, JobOptions
    from pipeline.keys import Keys, QueueLayout
    from pipeline.model.info import ModelInfo
    from pipeline.settings import Settings
    from pipeline.store.connections import RedisClient

QUEUE_WRITE_BATCH = 1000
MAX_REPORTED_INDEXES = 20


def pack_chunk(items: list[Item]) -> bytes:
    """Serialize one chunk of inputs for the `inputs` hash."""
    return orjson.dumps({
        "texts": [item.text for item in items],
        "ids": [item.id for item in items],
        "metadata": [item.metadata for item in items],
    })


@dataclass
class JobWriter:
    """Writes a job's inputs chunk by chunk, then commits the job and queues it."""

    redis: RedisClient
    keys: Keys
    settings: Settings
    options: JobOptions
    model: ModelInfo
    owner: str = ""
    job_id: str = field(default_factory=new_job_id)
    total: int = 0
    _buffer: list[Item] = field(default_factory=list)
    _chunks: int = 0
    _too_long: list[int] = field(default_factory=list)
    _sizes: list[int] = field(default_factory=list)
    digest: RequestDigest = field(init=False)
    scripts: JobScripts | None = None
    # Where its chunks are queued; None: the model's one bulk stream.
    layout: QueueLayout | None = None
    _listed: bool = False

    def __post_init__(self) -> None:
        self.digest = RequestDigest(self.options)
        if self.scripts is None:
            self.scripts = JobScripts(self.redis, self.keys)

    @property
    def _scripts(self) -> JobScripts:
        assert self.scripts is not None  # set in __post_init__
        return self.scripts

    def check_size(self, total: int) -> None:
        """Raise PayloadTooLarge for a job of more than `max_inputs` inputs."""
        if total > self.settings.max_inputs:
            raise PayloadTooLarge(f"a job holds at most {self.settings.max_inputs} inputs")

    async def add(self, item: Item) -> None:
        """Accept one validated input."""
        self.check_size(self.total + 1)
        self.digest.update(item)
        self._buffer.append(item)
        self.total += 1
        if len(self._buffer) >= self.settings.chunk_size:
            await self._flush()

    async def add_many(self, items: Iterable[Item]) -> None:
        """Accept many validated inputs."""
        for item in items:
            await self.add(item)

    async def _flush(self) -> None:
        if not self._buffer:
            return
        if not self.options.truncate and not self.options.chunk:
            # Tokenizing is CPU work: off the event loop, so other requests keep flowing.
            await asyncio.to_thread(self._check_lengths, self._buffer,
                                    self.total - len(self._buffer))
        inputs = self.keys.inputs(self.job_id)
        async with self.redis.pipeline(transaction=False) as pipe:  # one key: one slot
            pipe.hset(inputs, str(self._chunks), pack_chunk(self._buffer))
            pipe.expire(inputs, self.settings.staging_ttl_s)
            await pipe.execute()
        self._sizes.append(len(self._buffer))
        self._chunks += 1
        self._buffer = []

    def _check_lengths(self, items: list[Item], first_index: int) -> None:
        prompt = resolve_prompt(self.options, self.model)
        texts = with_prompt(prompt, [item.text for item in items])
        counts = tokens.count_tokens(self.model.name, texts)
        limit = self.model.max_seq_length
        self._too_long.extend(first_index + i for i, n in enumerate(counts) if n > limit)

    async def keep(self) -> None:
        """Push back the expiry of what the upload wrote so far (until it is visible)."""
        await self._scripts.keep_staged(self.job_id, self.settings.staging_ttl_s)

    async def commit(self, guard: Callable[[], Awaitable[None]] | None = None) -> JobRecord:
        """Validate the whole job, stage its record, queue its chunks, make it visible.

        `guard` runs just before the job is made visible; what it raises stops the commit.
        """
        await self._flush()
        if self.total == 0:
            await self.abort()
            raise InvalidInput("'inputs' is empty: give at least one text")
        if self._too_long:
            await self.abort()
            shown = ", ".join(map(str, self._too_long[:MAX_REPORTED_INDEXES]))
            more = len(self._too_long) - MAX_REPORTED_INDEXES
            raise InvalidInput(
                f"inputs exceed the model's {self.model.max_seq_length}-token limit at "
                f"index {shown}{f' and {more} more' if more > 0 else ''}; "
                "shorten them or submit with truncate=true",
                indexes=self._too_long,
            )
        record = self._record()
        scripts = self._scripts
        # Listed before it becomes visible: the lists are in other hash slots.
        self._listed = True
        await job_index.add(self.redis, self.keys, self.owner, self.job_id,
                            max_age_s=2 * self.settings.result_ttl_s)
        if not await scripts.stage(record, self.settings.staging_ttl_s):
            raise self._inputs_lost()
        await scripts.step("staged")
        await self.redis.zadd(self.keys.active_jobs, {self.job_id: record.created_ts})
        await scripts.step("indexed")
        await self._enqueue(record.lane)
        await scripts.step("enqueued")
        if guard is not None:
            await guard()
        activation = await scripts.activate(self.job_id, self.settings.result_ttl_s)
        if activation is Activation.JOB_GONE:
            raise Unavailable("the submission took longer than its staging time "
                              f"({self.settings.staging_ttl_s} s) allows; retry it")
        if activation is Activation.INPUTS_MISSING:
            raise self._inputs_lost()
        await scripts.step("activated")
        return dataclasses.replace(record, status=JobStatus.QUEUED)

    def _inputs_lost(self) -> Unavailable:
        return Unavailable(
            f"some of this upload's {self._chunks} chunks of inputs expired before it was "
            f"committed (its uploader stalled for longer than the staging time of "
            f"{self.settings.staging_ttl_s} s); nothing was queued: retry the upload")

    async def abort(self) -> bool:
        """Drop what was written, unless the job became visible (then it runs); True if dropped."""
        if not await self._scripts.discard(self.job_id):
            return False
        if self._listed:
            await job_index.remove(self.redis, self.keys, self.owner, self.job_id)
        return True

    def _record(self) -> JobRecord:
        lane = self._lane()
        return JobRecord(
            id=self.job_id, status=JobStatus.STAGED, total=self.total,
            model=self.model.name,
            dimensions=self.options.dimensions or self.model.dimensions,
            model_dimensions=self.model.dimensions, normalize=self.options.normalize,
            truncate=self.options.truncate, chunk=self.options.chunk,
            chunk_overlap=self.options.chunk_overlap,
            chunk_output=self.options.chunk_output, chunking=self.options.chunking,
            chunk_tokens=self.options.chunk_tokens or 0,
            chunk_boundary=self.options.chunk_boundary,
            prompt=resolve_prompt(self.options, self.model), chunk_size=self.settings.chunk_size,
            chunks=self._chunks, lane=lane, owner=self.owner, created_at=now_iso(),
            created_ts=time.time(),
            timeout_s=self.options.timeout_s or self.settings.job_timeout_s,
            traceparent=tracing.traceparent(),
        )

    def written_keys(self) -> list[str]:
        """A key of each slot a committed job was written to (its own, its queue's)."""
        layout = self._layout
        queues = [layout.fast] if self._lane() == "fast" else \
            [layout.bulk_of(chunk) for chunk in range(min(self._chunks, len(layout.bulks)))]
        return [self.keys.job(self.job_id), *queues]

    @property
    def _layout(self) -> QueueLayout:
        return self.layout or self.keys.layout(self.model.name)

    def _lane(self) -> str:
        return "fast" if self.total <= self.settings.fast_lane_max_texts else "bulk"

    async def _enqueue(self, lane: str) -> None:
        layout = self._layout
        trace = tracing.entry_fields()  # {} when tracing is off: no extra bytes per entry
        for start in range(0, self._chunks, QUEUE_WRITE_BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for chunk in range(start, min(start + QUEUE_WRITE_BATCH, self._chunks)):
                    stream = layout.fast if lane == "fast" else layout.bulk_of(chunk)
                    pipe.xadd(stream, {"job": self.job_id, "chunk": chunk, "n": self._sizes[chunk],
                                      **trace})
                await pipe.execute()
            await self._scripts.keep_staged(self.job_id, self.settings.staging_ttl_s)
            await self._scripts.step(f"enqueued:{start}")


def check_dimensions(options: JobOptions, model: ModelInfo) -> None:
    """Reject a `dimensions` the model cannot give."""
    if options.dimensions is not None and options.dimensions > model.dimensions:
        raise InvalidInput(
            f"'dimensions' is {options.dimensions}, but {model.name} gives at most "
            f"{model.dimensions}; use a value from 1 to {model.dimensions}"
        )


def check_model_options(options: JobOptions, model: ModelInfo) -> None:
    """Reject options this model cannot honour: dimensions, prompt_name, chunk_overlap."""
    check_dimensions(options, model)
    resolve_prompt(options, model)
    most = model.max_seq_length // 2
    if options.chunk and options.chunk_overlap > most:
        raise InvalidInput(f"'chunk_overlap' is {options.chunk_overlap} tokens; with "
                           f"{model.name}'s {model.max_seq_length}-token windows use 0 to {most}")
    if options.chunk:  # windows need the tokenizer: fail now, not in a worker
        # Sentence chunks do not overlap: the overlap then bounds nothing but windows.
        sentences = options.chunk_output == "chunks" and options.chunk_boundary == "sentence"
        check_windows(resolve_prompt(options, model), options.chunk_overlap,
                      model=model.name, max_seq_length=model.max_seq_length,
                      chunk_tokens=None if sentences else options.chunk_tokens)
        if sentences and options.chunk_tokens is not None:
            check_windows(resolve_prompt(options, model), 0, model=model.name,
                          max_seq_length=model.max_seq_length, chunk_tokens=options.chunk_tokens)
