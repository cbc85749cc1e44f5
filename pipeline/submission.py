"""Submission: writing a job's inputs in chunks, then its record and its queue entries.

A job's inputs are written chunk by chunk as they arrive (`JobWriter.add`),
so a large NDJSON upload is never held whole in memory; the job record and
its queue entries are written only at `commit()`, after every input passed
validation. A rejected upload leaves nothing behind and nothing queued.

Small jobs (at most `fast_lane_max_texts` inputs) go to the fast lane, which
workers read before the bulk lane, so a single query never waits behind a
million-line upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

from pipeline import feed, tokens
from pipeline.errors import InvalidInput, PayloadTooLarge
from pipeline.jobs import JobRecord, JobStatus, new_job_id, now_iso
from pipeline.prompts import resolve_prompt, with_prompt

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pipeline.connections import RedisClient
    from pipeline.inputs import Item, JobOptions
    from pipeline.keys import Keys
    from pipeline.models import ModelInfo
    from pipeline.settings import Settings

QUEUE_WRITE_BATCH = 1000
MAX_REPORTED_INDEXES = 20


def pack_chunk(items: list[Item]) -> bytes:
    """Serialize one chunk of inputs for the `inputs` hash."""
    return orjson.dumps({
        "texts": [item.text for item in items],
        "ids": [item.id for item in items],
        "metadata": [item.metadata for item in items],
    })


class RequestDigest:
    """A digest of a submission (options and every input), stored with its Idempotency-Key
    so a reuse of the key for a different request is told apart from a retry."""

    def __init__(self, options: JobOptions | None) -> None:
        self._hash = hashlib.sha256(orjson.dumps(repr(options)))

    def update(self, item: Item) -> None:
        """Add one input."""
        self._hash.update(orjson.dumps([item.text, item.id, item.metadata],
                                       option=orjson.OPT_SORT_KEYS) + b"\n")

    def hexdigest(self) -> str:
        return self._hash.hexdigest()[:32]


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

    def __post_init__(self) -> None:
        self.digest = RequestDigest(self.options)

    async def add(self, item: Item) -> None:
        """Accept one validated input."""
        if self.total >= self.settings.max_inputs:
            raise PayloadTooLarge(f"a job holds at most {self.settings.max_inputs} inputs")
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
        await self.redis.hset(self.keys.inputs(self.job_id), str(self._chunks),
                              pack_chunk(self._buffer))
        self._sizes.append(len(self._buffer))
        self._chunks += 1
        self._buffer = []

    def _check_lengths(self, items: list[Item], first_index: int) -> None:
        prompt = resolve_prompt(self.options, self.model)
        texts = with_prompt(prompt, [item.text for item in items])
        counts = tokens.count_tokens(self.model.name, texts)
        limit = self.model.max_seq_length
        self._too_long.extend(first_index + i for i, n in enumerate(counts) if n > limit)

    async def commit(self) -> JobRecord:
        """Validate the whole job, write its record and queue its chunks."""
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
        await self.redis.hset(self.keys.job(self.job_id), mapping=record.to_hash())
        await self._enqueue(record.lane)
        await feed.publish(self.redis, self.keys, "job.created", record.public(),
                           maxlen=self.settings.feed_maxlen)
        return record

    async def abort(self) -> None:
        """Drop whatever inputs were written; nothing was queued."""
        await self.redis.delete(self.keys.inputs(self.job_id))

    def _record(self) -> JobRecord:
        lane = "fast" if self.total <= self.settings.fast_lane_max_texts else "bulk"
        return JobRecord(
            id=self.job_id, status=JobStatus.QUEUED, total=self.total,
            model=self.model.name,
            dimensions=self.options.dimensions or self.model.dimensions,
            model_dimensions=self.model.dimensions, normalize=self.options.normalize,
            truncate=self.options.truncate, chunk=self.options.chunk,
            chunk_overlap=self.options.chunk_overlap,
            prompt=resolve_prompt(self.options, self.model), chunk_size=self.settings.chunk_size,
            chunks=self._chunks, lane=lane, owner=self.owner, created_at=now_iso(),
            created_ts=time.time(),
        )

    async def _enqueue(self, lane: str) -> None:
        stream = self.keys.queue(self.model.name, lane)
        for start in range(0, self._chunks, QUEUE_WRITE_BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for chunk in range(start, min(start + QUEUE_WRITE_BATCH, self._chunks)):
                    pipe.xadd(stream, {"job": self.job_id, "chunk": chunk, "n": self._sizes[chunk]})
                await pipe.execute()


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
    if options.chunk:
        tokens.tokenizer(model.name)  # windows need the tokenizer: fail now, not in a worker


@dataclass(frozen=True)
class IdempotencyClaim:
    """The job an Idempotency-Key already names, and the digest of its request
    (None while that request is still being uploaded)."""

    job_id: str
    digest: str | None


async def claim_idempotency_key(
    redis: RedisClient, keys: Keys, scope: str, key: str, job_id: str, ttl_s: int
) -> IdempotencyClaim | None:
    """Bind an Idempotency-Key to job_id; return what it already names, if anything.

    The value is `<job id>` while the upload runs, then `<job id> <digest>`
    (`record_request_digest`), so a later request can be compared with it.
    """
    name = keys.idempotency(scope, key)
    if await redis.set(name, job_id, nx=True, ex=ttl_s):
        return None
    existing = await redis.get(name)
    if not existing:
        return None
    bound, _, digest = existing.decode().partition(" ")
    return IdempotencyClaim(bound, digest or None)


async def record_request_digest(
    redis: RedisClient, keys: Keys, scope: str, key: str, job_id: str, digest: str
) -> None:
    """Store the request's digest with the key this upload holds (its TTL kept)."""
    await redis.set(keys.idempotency(scope, key), f"{job_id} {digest}", xx=True, keepttl=True)


async def release_idempotency_key(redis: RedisClient, keys: Keys, scope: str, key: str) -> None:
    """Forget a key whose job was rejected, so a corrected retry can use it."""
    await redis.delete(keys.idempotency(scope, key))
