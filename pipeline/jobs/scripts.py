"""Every script that changes a job, and the feed announcements of its life.

Each move of a job (see `pipeline.jobs.record` for the life it follows) is
one Lua script in `JobScripts`, registered once and run by hash, touching
only keys of the job's own hash slot (`{<job_id>}`). Lua scripts name
statuses through `_lua`, which fills in the enum's values, so the status
strings are spelled only in `JobStatus`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from string import Template
from typing import TYPE_CHECKING, Any

from pipeline.errors import JobNotFound
from pipeline.jobs.record import (
    TERMINAL_STATUSES,
    JobRecord,
    JobStatus,
    StepHook,
    check_job_id,
    load_job,
    no_step,
    now_iso,
)
from pipeline.store import feed
from pipeline.store.connections import text_of

if TYPE_CHECKING:
    from pipeline.jobs.results import ChunkResult
    from pipeline.keys import Keys
    from pipeline.settings import Settings
    from pipeline.store.commands import RedisPipeline
    from pipeline.store.connections import RedisClient


# The server's clock (seconds, float), so no process's clock decides a timeout.
_NOW = "(tonumber(redis.call('TIME')[1]) + tonumber(redis.call('TIME')[2]) / 1000000)"


def _lua(template: str) -> str:
    """A script with `$queued`, `$running`, ... replaced by the statuses' values, `$now` by TIME."""
    values = {s.name.lower(): s.value for s in JobStatus}
    return Template(template).substitute(values, now=_NOW)


# KEYS: job, inputs, vectors, events.
# ARGV: chunk, vectors, meta, done, failed, now, ttl, tokens, backend.
_COMMIT = _lua("""
local marker = 'm:' .. ARGV[1]
if redis.call('HEXISTS', KEYS[3], marker) == 1 then return {'duplicate'} end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'gone'} end
if status == '$cancelled' or status == '$completed' or status == '$failed' then
  return {'ended'}
end
redis.call('HSET', KEYS[3], 'v:' .. ARGV[1], ARGV[2], marker, ARGV[3])
local done = redis.call('HINCRBY', KEYS[1], 'done', ARGV[4])
local failed = redis.call('HINCRBY', KEYS[1], 'failed', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'tokens', ARGV[8])
if ARGV[9] ~= '' then  -- the backends that embedded the job, in the order they first did
  local seen = redis.call('HGET', KEYS[1], 'backend')
  if not seen then
    redis.call('HSET', KEYS[1], 'backend', ARGV[9])
  elseif not string.find(',' .. seen .. ',', ',' .. ARGV[9] .. ',', 1, true) then
    redis.call('HSET', KEYS[1], 'backend', seen .. ',' .. ARGV[9])
  end
end
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
if status == '$queued' then
  redis.call('HSET', KEYS[1], 'status', '$running', 'started_at', ARGV[6])
  status = '$running'
end
redis.call('XADD', KEYS[4], '*', 'type', 'result', 'chunk', ARGV[1],
           'done', done, 'failed', failed, 'total', total)
redis.call('HSET', KEYS[1], 'progress_ts', $now)
if done + failed >= total then
  status = '$completed'
  if done == 0 then
    status = '$failed'
    redis.call('HSET', KEYS[1], 'error', 'every input failed; see the results for reasons')
  end
  redis.call('HSET', KEYS[1], 'status', status, 'finished_at', ARGV[6])
  redis.call('XADD', KEYS[4], '*', 'type', 'end', 'status', status)
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[7]) end
  return {'last', done, failed, total, status}
end
-- Still running: every key lives as long as the job may wait, then its results do.
local live = math.floor(tonumber(redis.call('HGET', KEYS[1], 'timeout_s') or 3600) + ARGV[7])
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], live) end
return {'written', done, failed, total, status}
""")

# KEYS: job.  ARGV: now.
_MARK_STARTED = _lua("""
if redis.call('HGET', KEYS[1], 'status') == '$queued' then
  redis.call('HSET', KEYS[1], 'status', '$running', 'started_at', ARGV[1])
  return 1
end
return 0
""")

# KEYS: job, inputs, vectors, events.  ARGV: now, ttl.
_CANCEL = _lua("""
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == '$staged' then return {'gone'} end
if status == '$queued' or status == '$running' then
  redis.call('HSET', KEYS[1], 'status', '$cancelled', 'finished_at', ARGV[1])
  redis.call('XADD', KEYS[4], '*', 'type', 'end', 'status', '$cancelled')
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
  return {'cancelled'}
end
return {'ended'}
""")


# KEYS: job, inputs.  ARGV: ttl, chunks, then the record's fields.  0: a chunk is gone.
_STAGE = _lua("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('HLEN', KEYS[2]) ~= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
""")

# KEYS: job, inputs.  ARGV: ttl.  An upload's keys, before its record is written too.
_KEEP_STAGED = _lua("""
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= '$staged' then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 1
""")

# KEYS: job, inputs.  Drops a job that is still staged (never one that became visible).
_DISCARD = _lua("""
local status = redis.call('HGET', KEYS[1], 'status')
if status and status ~= '$staged' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
""")

# KEYS: job, inputs, vectors, events.  Drops a queued job no worker started (`withdraw`).
_WITHDRAW = _lua("""
if redis.call('HGET', KEYS[1], 'status') ~= '$queued' then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return 1
""")

# KEYS: job, inputs.  ARGV: result ttl.  Never makes visible a job with a chunk missing.
_ACTIVATE = _lua("""
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'gone' end
if status ~= '$staged' then return 'already' end
local chunks = tonumber(redis.call('HGET', KEYS[1], 'chunks'))
if redis.call('HLEN', KEYS[2]) ~= chunks then return 'missing' end
redis.call('HSET', KEYS[1], 'status', '$queued', 'progress_ts', $now)
local live = math.floor(tonumber(redis.call('HGET', KEYS[1], 'timeout_s')) + ARGV[1])
redis.call('EXPIRE', KEYS[1], live)
redis.call('EXPIRE', KEYS[2], live)
return 'activated'
""")

# KEYS: job, inputs, vectors, events.  ARGV: now, ttl, reason.
_TIME_OUT = _lua("""
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'gone' end
if status ~= '$queued' and status ~= '$running' then return 'ended' end
local last = tonumber(redis.call('HGET', KEYS[1], 'progress_ts') or
                      redis.call('HGET', KEYS[1], 'created_ts'))
if $now - last < tonumber(redis.call('HGET', KEYS[1], 'timeout_s')) then return 'alive' end
redis.call('HSET', KEYS[1], 'status', '$failed', 'error', ARGV[3], 'finished_at', ARGV[1])
redis.call('XADD', KEYS[4], '*', 'type', 'end', 'status', '$failed')
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
return 'failed'
""")

# KEYS: job.  ARGV: event, lease ms.  1 when this caller is to publish the event now.
_CLAIM_ANNOUNCEMENT = _lua("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local field = 'ann:' .. ARGV[1]
local held = redis.call('HGET', KEYS[1], field)
local now_ms = math.floor($now * 1000)
if held == 'done' or (held and tonumber(held) > now_ms) then return 0 end
redis.call('HSET', KEYS[1], field, now_ms + tonumber(ARGV[2]))
return 1
""")

# KEYS: job.  ARGV: event.  (HSET on an expired job would make a key without a TTL.)
_CONFIRM_ANNOUNCEMENT = _lua("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'ann:' .. ARGV[1], 'done')
return 1
""")


class Activation(enum.Enum):
    """What `activate` did with a staged job."""

    ACTIVATED = "activated"  # now queued: visible, with its long TTLs
    ALREADY = "already"  # someone activated it before (a retried call)
    JOB_GONE = "gone"  # its staging expired: the submission must start again
    INPUTS_MISSING = "missing"  # a chunk of its inputs expired: the submission must start again


class TimeOut(enum.Enum):
    """What `time_out` found."""

    FAILED = "failed"  # no progress within its timeout: now failed
    ALIVE = "alive"  # progress within its timeout: left alone
    ENDED = "ended"  # already finished (or still staged)
    JOB_GONE = "gone"


class CommitOutcome(enum.Enum):
    """What the commit script did with one chunk."""

    DUPLICATE = "duplicate"  # its done marker was set: a redelivery, nothing written
    JOB_GONE = "gone"  # the job expired or never existed
    JOB_ENDED = "ended"  # the job was already finished (cancelled): nothing written
    WRITTEN = "written"  # written; the job goes on
    LAST = "last"  # written, and it finished the job


@dataclass(frozen=True)
class Committed:
    """The outcome of one commit, with the job's counters after it when written."""

    outcome: CommitOutcome
    done: int = 0
    failed: int = 0
    total: int = 0
    status: JobStatus | None = None

    @property
    def written(self) -> bool:
        return self.outcome in (CommitOutcome.WRITTEN, CommitOutcome.LAST)

    @property
    def finished(self) -> bool:
        return self.outcome is CommitOutcome.LAST


class CancelOutcome(enum.Enum):
    """What the cancel script did."""

    CANCELLED = "cancelled"
    ALREADY_ENDED = "ended"
    JOB_GONE = "gone"


class JobScripts:
    """Every Lua script that changes a job, registered once on one client.

    Each method that takes `pipe` adds its script to that pipeline (redis-py
    loads missing scripts when the pipeline runs); its reply is decoded with
    the matching `parse_*`. The others run the script at once.
    """

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        # Called between the steps of multi-step writes (submission, cancel), by name.
        self.step: StepHook = no_step
        self._commit = redis.register_script(_COMMIT)
        self._mark_started = redis.register_script(_MARK_STARTED)
        self._cancel = redis.register_script(_CANCEL)
        self._stage = redis.register_script(_STAGE)
        self._keep_staged = redis.register_script(_KEEP_STAGED)
        self._activate = redis.register_script(_ACTIVATE)
        self._discard = redis.register_script(_DISCARD)
        self._withdraw = redis.register_script(_WITHDRAW)
        self._time_out = redis.register_script(_TIME_OUT)
        self._claim_announcement = redis.register_script(_CLAIM_ANNOUNCEMENT)
        self._confirm_announcement = redis.register_script(_CONFIRM_ANNOUNCEMENT)

    async def queue_commit(self, pipe: RedisPipeline, result: ChunkResult, ttl_s: int) -> None:
        """Add one chunk's idempotent commit to `pipe`."""
        await self._commit(
            keys=self.keys.job_keys(result.job_id),
            args=[result.chunk, result.stored_vectors(), result.meta(),
                  len(result.vectors) - len(result.errors), len(result.errors), now_iso(),
                  ttl_s, result.tokens, result.backend],
            client=pipe)

    @staticmethod
    def parse_committed(reply: list[Any]) -> Committed:
        """Decode the commit script's reply."""
        outcome = CommitOutcome(text_of(reply[0]))
        if len(reply) == 1:
            return Committed(outcome)
        return Committed(outcome, int(reply[1]), int(reply[2]), int(reply[3]),
                         JobStatus(text_of(reply[4])))

    async def queue_mark_started(self, pipe: RedisPipeline, job_id: str) -> None:
        """Add "queued -> running" to `pipe` (a no-op for a job past queued)."""
        await self._mark_started(keys=[self.keys.job(job_id)], args=[now_iso()], client=pipe)

    async def cancel(self, job_id: str, ttl_s: int) -> CancelOutcome:
        """Cancel a queued or running job; its keys then expire after `ttl_s`."""
        reply = await self._cancel(keys=self.keys.job_keys(job_id), args=[now_iso(), ttl_s])
        return CancelOutcome(text_of(reply[0]))

    async def stage(self, record: JobRecord, ttl_s: int) -> bool:
        """Write a staged job's record (kept if one is there); False if a chunk is gone."""
        fields = [x for pair in record.to_hash().items() for x in pair]
        keys = [self.keys.job(record.id), self.keys.inputs(record.id)]
        return bool(await self._stage(keys=keys, args=[ttl_s, record.chunks, *fields]))

    async def keep_staged(self, job_id: str, ttl_s: int) -> bool:
        """Push back the expiry of an upload's inputs and staged record (False once visible)."""
        keys = [self.keys.job(job_id), self.keys.inputs(job_id)]
        return bool(await self._keep_staged(keys=keys, args=[ttl_s]))

    async def activate(self, job_id: str, result_ttl_s: int) -> Activation:
        """staged -> queued, with TTLs of the job's timeout plus the results' lifetime."""
        keys = [self.keys.job(job_id), self.keys.inputs(job_id)]
        return Activation(text_of(await self._activate(keys=keys, args=[result_ttl_s])))

    async def discard(self, job_id: str) -> bool:
        """Drop a submission that never became visible: its staged record and inputs."""
        keys = [self.keys.job(job_id), self.keys.inputs(job_id)]
        return bool(await self._discard(keys=keys))

    async def withdraw(self, job_id: str) -> bool:
        """Drop a queued job no worker started, whose submitter lost its Idempotency-Key to
        another job before anyone was told of it (False: it runs on)."""
        return bool(await self._withdraw(keys=self.keys.job_keys(job_id)))

    async def time_out(self, job_id: str, ttl_s: int, reason: str) -> TimeOut:
        """Fail a queued or running job that made no progress within its timeout."""
        reply = await self._time_out(keys=self.keys.job_keys(job_id),
                                     args=[now_iso(), ttl_s, reason])
        return TimeOut(text_of(reply))

    async def claim_announcement(self, job_id: str, event: str, lease_ms: int) -> bool:
        """True when this caller should publish `event` now (nobody did, nobody is)."""
        reply = await self._claim_announcement(keys=[self.keys.job(job_id)],
                                               args=[event, lease_ms])
        return bool(reply)

    async def confirm_announcement(self, job_id: str, event: str) -> None:
        """Record that `event` is on the feed, so nobody publishes it again."""
        await self._confirm_announcement(keys=[self.keys.job(job_id)], args=[event])


ANNOUNCE_LEASE_MS = 10_000
ANNOUNCED_EVENTS = ("job.created", *(f"job.{s.value}" for s in TERMINAL_STATUSES))


async def announce(
    scripts: JobScripts, job_id: str, event: str, data: Mapping[str, object], *, maxlen: int
) -> bool:
    """Publish a job's lifecycle event on the feed once, whoever notices first.

    Claim, publish, confirm: a noticer that dies after its claim leaves the
    event to the next one (the janitor) once the claim's lease ends, so the
    event is published at least once, and twice only if a publisher stalls
    longer than the lease between its claim and its publish.
    """
    if not await scripts.claim_announcement(job_id, event, ANNOUNCE_LEASE_MS):
        return False
    await feed.append(scripts.redis, scripts.keys, event, dict(data), maxlen=maxlen)
    await scripts.confirm_announcement(job_id, event)
    return True


async def announce_created(scripts: JobScripts, job_id: str, *, maxlen: int
                           ) -> JobRecord | None:
    """Announce `job.created` unless someone did: whoever announces a later event calls
    this first, so the feed tells a job's creation before its end even when its
    submitter died right after making it visible. The job's record as read here
    (None if the job is gone), for the caller's own event."""
    raw = await scripts.redis.hgetall(scripts.keys.job(job_id))
    if not raw:
        return None
    record = JobRecord.from_hash(raw)
    if raw.get(b"ann:job.created") != b"done":
        await announce(scripts, job_id, "job.created", record.public(), maxlen=maxlen)
    return record


async def cancel_job(scripts: JobScripts, settings: Settings, job_id: str) -> JobRecord:
    """Cancel a queued or running job (a finished job is left as it is); its record after."""
    outcome = await scripts.cancel(check_job_id(job_id), settings.result_ttl_s)
    if outcome is CancelOutcome.JOB_GONE:
        raise JobNotFound(f"job {job_id} does not exist or has expired")
    record = await load_job(scripts.redis, scripts.keys, job_id)
    if outcome is CancelOutcome.CANCELLED:
        await scripts.step("cancelled")
        await announce_created(scripts, job_id, maxlen=settings.feed_maxlen)
        await announce(scripts, job_id, "job.cancelled", record.public(),
                       maxlen=settings.feed_maxlen)
    return record
