"""The job: its status, its record in the job hash, and every script that changes it.

A job's life, and who makes each move (saq's `Job` is the model):

    queued ──────────► running ──────────► completed
      │   first worker     │   the commit of      (every input embedded,
      │   to take a chunk  │   the last chunk      or some failed)
      │   (mark_started,   │   (commit)        ──► failed
      │   or its commit)   │                       (every input failed)
      │                    │
      └────────────────────┴─────────────────► cancelled
                 a client (cancel: DELETE /v1/jobs/{id}, cancel_job)

`completed`, `failed` and `cancelled` are terminal (`TERMINAL_STATUSES`):
no script moves a job out of them, and a commit arriving after one writes
nothing. Every move is one Lua script in `JobScripts`, registered once and
run by hash, touching only keys of the job's own hash slot (`{<job_id>}`).

The job hash is read and written in one place, `JobRecord`; nothing else
parses its fields. Lua scripts name statuses through `_lua`, which fills in
the enum's values, so the status strings are spelled only in `JobStatus`.
"""

from __future__ import annotations

import enum
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from string import Template
from typing import TYPE_CHECKING, Any

from pipeline import feed
from pipeline.errors import InvalidJobId, JobNotFound

if TYPE_CHECKING:
    from pipeline.connections import RedisClient
    from pipeline.keys import Keys
    from pipeline.results import ChunkResult
    from pipeline.settings import Settings

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobStatus(enum.StrEnum):
    """Where a job is in its life (see the module docstring for the moves)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})


def new_job_id() -> str:
    """A fresh, unguessable job id."""
    return uuid.uuid4().hex


def check_job_id(job_id: str) -> str:
    """Return the id if it is well formed, else raise InvalidJobId."""
    if not JOB_ID.fullmatch(job_id):  # fullmatch: `$` would let a trailing newline in
        raise InvalidJobId(f"malformed job id {job_id[:80]!r}: expected 32 hex characters")
    return job_id


def now_iso() -> str:
    """The current UTC time as ISO 8601 with a Z."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class JobRecord:
    """The job hash, typed: what a job is and how far it got."""

    id: str
    status: JobStatus
    total: int
    model: str
    dimensions: int
    model_dimensions: int
    normalize: bool
    truncate: bool
    chunk_size: int
    chunks: int
    lane: str
    created_at: str
    created_ts: float
    owner: str = ""
    chunk: bool = False
    chunk_overlap: int = 0
    prompt: str = ""
    done: int = 0
    failed: int = 0
    tokens: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None

    @classmethod
    def from_hash(cls, raw: Mapping[bytes, bytes]) -> JobRecord:
        """Parse HGETALL of the job hash (which must not be empty)."""
        f = {k.decode(): v.decode() for k, v in raw.items()}
        return cls(
            id=f["id"], status=JobStatus(f["status"]), total=int(f["total"]), model=f["model"],
            dimensions=int(f["dimensions"]), model_dimensions=int(f["model_dimensions"]),
            normalize=f["normalize"] == "1", truncate=f["truncate"] == "1",
            chunk_size=int(f["chunk_size"]), chunks=int(f["chunks"]), lane=f["lane"],
            created_at=f["created_at"], created_ts=float(f["created_ts"]),
            owner=f.get("owner", ""), chunk=f.get("chunk") == "1",
            chunk_overlap=int(f.get("chunk_overlap") or 0), prompt=f.get("prompt", ""),
            done=int(f.get("done", 0)),
            failed=int(f.get("failed", 0)), tokens=int(f.get("tokens", 0)),
            started_at=f.get("started_at") or None, finished_at=f.get("finished_at") or None,
            error=f.get("error") or None,
        )

    def to_hash(self) -> dict[str, str | int | float]:
        """The fields to HSET (unset optional fields left out)."""
        fields: dict[str, str | int | float] = {
            "id": self.id, "status": self.status.value, "total": self.total,
            "done": self.done, "failed": self.failed, "tokens": self.tokens,
            "model": self.model, "dimensions": self.dimensions,
            "model_dimensions": self.model_dimensions, "normalize": int(self.normalize),
            "truncate": int(self.truncate), "chunk": int(self.chunk),
            "chunk_overlap": self.chunk_overlap, "prompt": self.prompt,
            "chunk_size": self.chunk_size,
            "chunks": self.chunks, "lane": self.lane, "owner": self.owner,
            "created_at": self.created_at, "created_ts": self.created_ts,
        }
        optional = {"started_at": self.started_at, "finished_at": self.finished_at,
                    "error": self.error}
        fields.update({k: v for k, v in optional.items() if v is not None})
        return fields

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def output_dimensions(self) -> int | None:
        """The Matryoshka cut a worker applies, or None for the model's full size."""
        return self.dimensions if self.dimensions < self.model_dimensions else None

    def public(self) -> dict[str, Any]:
        """The job as the API shows it."""
        return {
            "id": self.id, "status": self.status.value, "total": self.total,
            "done": self.done, "failed": self.failed, "model": self.model,
            "dimensions": self.dimensions, "created_at": self.created_at or None,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "error": self.error,
        }


async def load_job(redis: RedisClient, keys: Keys, job_id: str) -> JobRecord:
    """The job's record, or JobNotFound."""
    raw = await redis.hgetall(keys.job(check_job_id(job_id)))
    if not raw:
        raise JobNotFound(f"job {job_id} does not exist or has expired")
    return JobRecord.from_hash(raw)


async def get_job(redis: RedisClient, keys: Keys, job_id: str) -> dict[str, Any]:
    """The public view of a job."""
    return (await load_job(redis, keys, job_id)).public()


def _lua(template: str) -> str:
    """A script with `$queued`, `$running`, ... replaced by the statuses' values."""
    return Template(template).substitute({s.name.lower(): s.value for s in JobStatus})


# KEYS: job, inputs, vectors, events.  ARGV: chunk, vectors, meta, done, failed, now, ttl, tokens.
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
local total = tonumber(redis.call('HGET', KEYS[1], 'total'))
if status == '$queued' then
  redis.call('HSET', KEYS[1], 'status', '$running', 'started_at', ARGV[6])
  status = '$running'
end
redis.call('XADD', KEYS[4], '*', 'type', 'result', 'chunk', ARGV[1],
           'done', done, 'failed', failed, 'total', total)
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
if not status then return {'gone'} end
if status == '$queued' or status == '$running' then
  redis.call('HSET', KEYS[1], 'status', '$cancelled', 'finished_at', ARGV[1])
  redis.call('XADD', KEYS[4], '*', 'type', 'end', 'status', '$cancelled')
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[2]) end
  return {'cancelled'}
end
return {'ended'}
""")


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


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class JobScripts:
    """Every Lua script that changes a job, registered once on one client.

    Each method that takes `pipe` adds its script to that pipeline (redis-py
    loads missing scripts when the pipeline runs); its reply is decoded with
    the matching `parse_*`. The others run the script at once.
    """

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._commit = redis.register_script(_COMMIT)
        self._mark_started = redis.register_script(_MARK_STARTED)
        self._cancel = redis.register_script(_CANCEL)

    async def queue_commit(self, pipe: Any, result: ChunkResult, ttl_s: int) -> None:
        """Add one chunk's idempotent commit to `pipe`."""
        vectors = result.vectors.astype("<f4", copy=False).tobytes()
        await self._commit(
            keys=self.keys.job_keys(result.job_id),
            args=[result.chunk, vectors, result.meta(),
                  len(result.vectors) - len(result.errors), len(result.errors), now_iso(),
                  ttl_s, result.tokens],
            client=pipe)

    @staticmethod
    def parse_committed(reply: list[Any]) -> Committed:
        """Decode the commit script's reply."""
        outcome = CommitOutcome(_text(reply[0]))
        if len(reply) == 1:
            return Committed(outcome)
        return Committed(outcome, int(reply[1]), int(reply[2]), int(reply[3]),
                         JobStatus(_text(reply[4])))

    async def queue_mark_started(self, pipe: Any, job_id: str) -> None:
        """Add "queued -> running" to `pipe` (a no-op for a job past queued)."""
        await self._mark_started(keys=[self.keys.job(job_id)], args=[now_iso()], client=pipe)

    async def cancel(self, job_id: str, ttl_s: int) -> CancelOutcome:
        """Cancel a queued or running job; its keys then expire after `ttl_s`."""
        reply = await self._cancel(keys=self.keys.job_keys(job_id), args=[now_iso(), ttl_s])
        return CancelOutcome(_text(reply[0]))


async def cancel_job(scripts: JobScripts, settings: Settings, job_id: str) -> dict[str, Any]:
    """Cancel a queued or running job (a finished job is left as it is); its public view."""
    outcome = await scripts.cancel(check_job_id(job_id), settings.result_ttl_s)
    if outcome is CancelOutcome.JOB_GONE:
        raise JobNotFound(f"job {job_id} does not exist or has expired")
    job = await get_job(scripts.redis, scripts.keys, job_id)
    if outcome is CancelOutcome.CANCELLED:
        await feed.publish(scripts.redis, scripts.keys, "job.cancelled", job,
                           maxlen=settings.feed_maxlen)
    return job
