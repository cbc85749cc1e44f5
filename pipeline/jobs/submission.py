"""Submission: staging a job's inputs and record, queueing it, then making it visible.

A job is wholly queued or never seen. The steps, each safe to die after:

1. inputs are written chunk by chunk as they arrive (`JobWriter.add`), under
   `staging_ttl_s`, refreshed with every chunk: an upload that dies leaves
   keys that expire by themselves;
2. after every input passed validation, the record is written as `staged`
   (same TTL), and the job is added to the active-jobs index (a global key,
   so before the job can be seen; the janitor prunes entries whose job is gone);
3. its queue entries are added (`XADD`, in batches, refreshing the TTLs); a
   worker that reads one while the job is still staged leaves it for later;
4. `activate`, one script in the job's slot, makes it `queued` with its long
   TTLs: from here on readers see it, and workers embed it;
5. the Idempotency-Key is bound to it, and `job.created` is announced (once,
   by whoever gets there first: the submitter or the janitor).

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
import enum
import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.errors import Conflict, InvalidInput, JobNotFound, PayloadTooLarge, Unavailable
from pipeline.jobs.record import JobRecord, JobStatus, load_job, new_job_id, now_iso
from pipeline.jobs.scripts import Activation, JobScripts
from pipeline.model import tokens
from pipeline.model.prompts import resolve_prompt, with_prompt

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pipeline.inputs import Item, JobOptions
    from pipeline.keys import Keys
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
    scripts: JobScripts | None = None

    def __post_init__(self) -> None:
        self.digest = RequestDigest(self.options)
        if self.scripts is None:
            self.scripts = JobScripts(self.redis, self.keys)

    @property
    def _scripts(self) -> JobScripts:
        assert self.scripts is not None  # set in __post_init__
        return self.scripts

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

    async def commit(self) -> JobRecord:
        """Validate the whole job, stage its record, queue its chunks, make it visible."""
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
        await scripts.stage(record, self.settings.staging_ttl_s)
        await scripts.step("staged")
        await self.redis.zadd(self.keys.active_jobs, {self.job_id: record.created_ts})
        await scripts.step("indexed")
        await self._enqueue(record.lane)
        await scripts.step("enqueued")
        if await scripts.activate(self.job_id, self.settings.result_ttl_s) is Activation.JOB_GONE:
            raise Unavailable("the submission took longer than its staging time "
                              f"({self.settings.staging_ttl_s} s) allows; retry it")
        await scripts.step("activated")
        return dataclasses.replace(record, status=JobStatus.QUEUED)

    async def abort(self) -> bool:
        """Drop what was written, unless the job became visible (then it runs); True if dropped."""
        return await self._scripts.discard(self.job_id)

    def _record(self) -> JobRecord:
        lane = "fast" if self.total <= self.settings.fast_lane_max_texts else "bulk"
        return JobRecord(
            id=self.job_id, status=JobStatus.STAGED, total=self.total,
            model=self.model.name,
            dimensions=self.options.dimensions or self.model.dimensions,
            model_dimensions=self.model.dimensions, normalize=self.options.normalize,
            truncate=self.options.truncate, chunk=self.options.chunk,
            chunk_overlap=self.options.chunk_overlap,
            prompt=resolve_prompt(self.options, self.model), chunk_size=self.settings.chunk_size,
            chunks=self._chunks, lane=lane, owner=self.owner, created_at=now_iso(),
            created_ts=time.time(),
            timeout_s=self.options.timeout_s or self.settings.job_timeout_s,
        )

    async def _enqueue(self, lane: str) -> None:
        stream = self.keys.queue(self.model.name, lane)
        for start in range(0, self._chunks, QUEUE_WRITE_BATCH):
            async with self.redis.pipeline(transaction=False) as pipe:
                for chunk in range(start, min(start + QUEUE_WRITE_BATCH, self._chunks)):
                    pipe.xadd(stream, {"job": self.job_id, "chunk": chunk, "n": self._sizes[chunk]})
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
    if options.chunk:
        tokens.tokenizer(model.name)  # windows need the tokenizer: fail now, not in a worker


class Hold(enum.Enum):
    """What an Idempotency-Key says when a submission tries to take it."""

    TAKEN = "taken"  # free: now leased to this submission
    BOUND = "bound"  # names a queued job ("<job id> <request digest>"): answer with it
    HELD = "held"  # another upload holds a live lease on it: 409
    LAPSED = "lapsed"  # an upload's lease ran out: its job may or may not be visible


@dataclass(frozen=True)
class KeyState:
    """An Idempotency-Key's state, the job it names, and its raw value (for a swap)."""

    hold: Hold
    job_id: str | None = None
    raw: bytes | None = None


# KEYS: idem.  ARGV: job id, lease ms, ttl s.  A value "<job>:<until ms>" is a lease.
_CLAIM_KEY = """
local value = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not value then
  redis.call('SET', KEYS[1], ARGV[1] .. ':' .. (now_ms + tonumber(ARGV[2])), 'EX', ARGV[3])
  return {'taken'}
end
local job, until_ms = string.match(value, '^(%x+):(%d+)$')
if not job then return {'bound', value, value} end
if tonumber(until_ms) > now_ms then return {'held', job, value} end
return {'lapsed', job, value}
"""

# KEYS: idem.  ARGV: expected value, job id, lease ms (0: bind to the job), ttl s.
_SWAP_KEY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local value = ARGV[2]
if tonumber(ARGV[3]) > 0 then
  local t = redis.call('TIME')
  value = value .. ':' .. (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ARGV[3])
end
redis.call('SET', KEYS[1], value, 'EX', ARGV[4])
return 1
"""

# KEYS: idem.  ARGV: job id, lease ms (0: bind), ttl s, bound value.  Only this job's lease.
_KEEP_KEY = """
local value = redis.call('GET', KEYS[1])
if not value or string.sub(value, 1, #ARGV[1] + 1) ~= ARGV[1] .. ':' then return 0 end
if tonumber(ARGV[2]) == 0 then
  redis.call('SET', KEYS[1], ARGV[4], 'EX', ARGV[3])
  return 1
end
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ARGV[2]
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. until_ms, 'KEEPTTL')
return 1
"""

# KEYS: idem.  ARGV: job id.  Frees the key if this job's upload still holds it.
_RELEASE_KEY = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class IdempotencyKeys:
    """Idempotency-Keys: leased while an upload runs, bound to its job once queued.

    The lease is a deadline inside the value (read against the server's clock),
    not the key's TTL, so a lapsed lease still names its job: a retry after
    the uploader died between making the job visible and binding the key
    finds that job instead of making a second one.
    """

    def __init__(self, redis: RedisClient, keys: Keys, settings: Settings,
                 bound_ttl_s: int) -> None:
        self.keys = keys
        self.lease_ms = int(settings.idempotency_lease_s * 1000)
        self.bound_ttl_s = bound_ttl_s
        self._claim = redis.register_script(_CLAIM_KEY)
        self._swap = redis.register_script(_SWAP_KEY)
        self._keep = redis.register_script(_KEEP_KEY)
        self._release = redis.register_script(_RELEASE_KEY)

    async def claim(self, scope: str, key: str, job_id: str) -> KeyState:
        """Lease the key to `job_id` if it is free; else say what holds it."""
        reply = await self._claim(keys=[self.keys.idempotency(scope, key)],
                                  args=[job_id, self.lease_ms, self.bound_ttl_s])
        hold = Hold(_text(reply[0]))
        if len(reply) == 1:
            return KeyState(hold)
        return KeyState(hold, _text(reply[1]), reply[2])

    async def swap(self, scope: str, key: str, expected: bytes, job_id: str,
                   *, lease: bool) -> bool:
        """Replace the value if unchanged: lease it to `job_id`, or bind it to that job."""
        reply = await self._swap(keys=[self.keys.idempotency(scope, key)],
                                 args=[expected, job_id, self.lease_ms if lease else 0,
                                       self.bound_ttl_s])
        return bool(reply)

    async def renew(self, scope: str, key: str, job_id: str) -> bool:
        """Push this upload's lease back; False if the lease was lost."""
        reply = await self._keep(keys=[self.keys.idempotency(scope, key)],
                                 args=[job_id, self.lease_ms, self.bound_ttl_s, ""])
        return bool(reply)

    async def bind(self, scope: str, key: str, job_id: str, digest: str) -> bool:
        """Turn this upload's lease into the binding to its (now queued) job and request."""
        reply = await self._keep(keys=[self.keys.idempotency(scope, key)],
                                 args=[job_id, 0, self.bound_ttl_s, f"{job_id} {digest}"])
        return bool(reply)

    async def release(self, scope: str, key: str, job_id: str) -> None:
        """Free the key of a submission that was rejected or died, so a retry can use it."""
        await self._release(keys=[self.keys.idempotency(scope, key)], args=[job_id])


MAX_KEY_TRIES = 5


@dataclass(frozen=True)
class IdempotencyClaim:
    """The job an Idempotency-Key already names, and the digest of its request
    (None when its uploader died before binding it: nothing to compare with)."""

    job_id: str
    digest: str | None


async def take_key(
    idem: IdempotencyKeys, redis: RedisClient, keys: Keys, scope: str, key: str, job_id: str
) -> IdempotencyClaim | None:
    """Lease `key` to the submission of `job_id` (None), or what the key already names.

    Raises Conflict while another upload holds a live lease on the key.
    """
    for _ in range(MAX_KEY_TRIES):
        state = await idem.claim(scope, key, job_id)
        if state.hold is Hold.TAKEN:
            return None
        if state.hold is Hold.HELD:
            raise Conflict("a submission with this Idempotency-Key is being uploaded right "
                           "now; retry in a moment to get its job")
        assert state.job_id is not None and state.raw is not None
        named, _, digest = state.job_id.partition(" ")
        if await _visible(redis, keys, named):
            if state.hold is Hold.BOUND or await idem.swap(scope, key, state.raw,
                                                           named, lease=False):
                return IdempotencyClaim(named, digest or None)
        elif await idem.swap(scope, key, state.raw, job_id, lease=True):
            return None  # the job it named never became visible, or expired: start afresh
    raise Conflict("this Idempotency-Key kept changing hands; retry in a moment")


async def _visible(redis: RedisClient, keys: Keys, job_id: str) -> bool:
    try:
        await load_job(redis, keys, job_id)
    except JobNotFound:
        return False
    return True
