"""The job: its status and its record in the job hash; `pipeline.jobs.scripts` moves it.

A job's life, and who makes each move (saq's `Job` is the model):

    staged ──► queued ─────────► running ─────────► completed
      │         │  first worker   │  the commit of     (every input embedded,
      │         │  to take a      │  the last chunk     or some failed)
      │         │  chunk          │  (commit)       ──► failed
      │         │  (mark_started, │                     (every input failed; or no
      │         │  or its commit) │                      progress within the job's
      │         │                 │                      timeout: the janitor, time_out)
      │         └─────────────────┴────────────────► cancelled
      │                       a client (cancel: DELETE /v1/jobs/{id}, cancel_job)
      └─ the submitter (stage, then activate once every queue entry is in)

`staged` belongs to the submitter (`pipeline.jobs.submission`): the record, the
inputs and the queue entries are being written, under short TTLs, and
`activate` makes the job `queued` only once every queue entry is in, so a
job is wholly queued or never seen. A reader is told a staged job does not
exist; a worker leaves its entries for later; a staged job whose submitter
died expires by itself.

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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypedDict

from pipeline.errors import InvalidJobId, JobNotFound

if TYPE_CHECKING:
    from pipeline.keys import Keys
    from pipeline.store.connections import RedisClient

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
StepHook = Callable[[str], Awaitable[None]]


async def no_step(name: str) -> None:
    """The default step hook: nothing. Fault tests give one that dies at a chosen step."""


class JobStatus(enum.StrEnum):
    """Where a job is in its life (see the module docstring for the moves)."""

    STAGED = "staged"  # never shown: a reader is told the job does not exist
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
PUBLIC_STATUSES = tuple(s for s in JobStatus if s is not JobStatus.STAGED)


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


class PublicJob(TypedDict):
    """A job as the API shows it (REST, MCP, the feed's job events)."""

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
    backend: str | None


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
    # Per-chunk vectors (`chunk_output: "chunks"`); chunk_tokens 0: the model's window.
    chunk_output: str = "pooled"
    chunking: str = "separate"
    chunk_tokens: int = 0
    chunk_boundary: str = "tokens"
    prompt: str = ""
    timeout_s: float = 3600.0
    done: int = 0
    failed: int = 0
    tokens: int = 0
    backend: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = None
    # The W3C traceparent of the job's submit span; "" unless tracing was on (`pipeline.tracing`).
    traceparent: str = ""

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
            chunk_output=f.get("chunk_output", "pooled"), chunking=f.get("chunking", "separate"),
            chunk_tokens=int(f.get("chunk_tokens") or 0),
            chunk_boundary=f.get("chunk_boundary", "tokens"),
            timeout_s=float(f.get("timeout_s") or 3600.0),
            done=int(f.get("done", 0)),
            failed=int(f.get("failed", 0)), tokens=int(f.get("tokens", 0)),
            backend=f.get("backend", ""),
            started_at=f.get("started_at") or None, finished_at=f.get("finished_at") or None,
            error=f.get("error") or None, traceparent=f.get("traceparent", ""),
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
            "chunk_output": self.chunk_output, "chunking": self.chunking,
            "chunk_tokens": self.chunk_tokens, "chunk_boundary": self.chunk_boundary,
            "timeout_s": self.timeout_s,
            "chunk_size": self.chunk_size,
            "chunks": self.chunks, "lane": self.lane, "owner": self.owner,
            "created_at": self.created_at, "created_ts": self.created_ts,
        }
        optional = {"started_at": self.started_at, "finished_at": self.finished_at,
                    "error": self.error, "backend": self.backend or None,
                    "traceparent": self.traceparent or None}
        fields.update({k: v for k, v in optional.items() if v is not None})
        return fields

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def output_dimensions(self) -> int | None:
        """The Matryoshka cut a worker applies, or None for the model's full size."""
        return self.dimensions if self.dimensions < self.model_dimensions else None

    def public(self) -> PublicJob:
        """The job as the API shows it."""
        return {
            "id": self.id, "status": self.status.value, "total": self.total,
            "done": self.done, "failed": self.failed, "model": self.model,
            "dimensions": self.dimensions, "created_at": self.created_at or None,
            "started_at": self.started_at, "finished_at": self.finished_at,
            "error": self.error, "backend": self.backend or None,
        }


async def load_job(redis: RedisClient, keys: Keys, job_id: str) -> JobRecord:
    """The job's record, or JobNotFound."""
    raw = await redis.hgetall(keys.job(check_job_id(job_id)))
    record = JobRecord.from_hash(raw) if raw else None
    if record is None or record.status is JobStatus.STAGED:
        raise JobNotFound(f"job {job_id} does not exist or has expired")
    return record
