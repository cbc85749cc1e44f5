"""The job lists: every job id by creation time, globally and per owner (`GET /v1/jobs`).

Two sorted sets, scored by creation time in microseconds: `keys.job_index(owner)`
for one owner's jobs and `keys.job_index(None)` for every job (admin keys).
They live in other hash slots than the jobs they name (one list spans many
jobs), so they cannot be written in the job's own script. Instead:

- an id is added before its job becomes visible, so a listed job never goes
  missing from the list; a submission that fails afterwards leaves an id
  whose job does not exist, which readers skip;
- readers load each listed job and prune the ids whose job no longer exists
  (expired, or never committed); `add` also drops ids older than `max_age_s`,
  so a list nobody reads stays bounded.

A page cursor is `<score>-<job id>` of the last job returned; the next page
starts strictly after it, so jobs created meanwhile never shift a page.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import InvalidCursor, InvalidRequest
from pipeline.jobs.record import PUBLIC_STATUSES, JobRecord, JobStatus
from pipeline.jobs.tenants import Caller, visible

if TYPE_CHECKING:
    from pipeline.keys import Keys
    from pipeline.store.connections import RedisClient

CURSOR = re.compile(r"([0-9]{1,20})-([0-9a-f]{32})")
MAX_LIMIT = 200
# A status filter may skip many jobs; one request scans at most this many ids
# and returns a short page with a cursor rather than walk a whole history.
MAX_SCAN = 2_000


@dataclass(frozen=True)
class JobPage:
    """One page of a job list, newest first; `next_cursor` is None at the end."""

    jobs: list[JobRecord]
    next_cursor: str | None


def created_score() -> int:
    """The index score of a job created now (microseconds since the epoch)."""
    return time.time_ns() // 1000


async def add(
    redis: RedisClient, keys: Keys, owner: str, job_id: str, *, max_age_s: float
) -> None:
    """List a job (before it becomes visible) and drop ids past `max_age_s`."""
    score = created_score()
    floor = score - int(max_age_s * 1_000_000)
    for name in (keys.job_index(owner), keys.job_index(None)):
        async with redis.pipeline(transaction=False) as pipe:
            pipe.zadd(name, {job_id: score})
            pipe.zremrangebyscore(name, "-inf", f"({floor}")
            await pipe.execute()


async def remove(redis: RedisClient, keys: Keys, owner: str, job_id: str) -> None:
    """Unlist a job that was never committed."""
    for name in (keys.job_index(owner), keys.job_index(None)):
        await redis.zrem(name, job_id)


def _parse_cursor(cursor: str | None) -> tuple[int, str] | None:
    if not cursor:
        return None
    match = CURSOR.fullmatch(cursor)
    if match is None:
        raise InvalidCursor(f"malformed cursor {cursor[:60]!r}: use the next_cursor of a page")
    return int(match.group(1)), match.group(2)


def check_status(status: str | None) -> JobStatus | None:
    """A status filter must name a job status a reader can see."""
    if not status:
        return None
    if status not in PUBLIC_STATUSES:
        raise InvalidRequest("query parameter 'status' must be one of "
                             f"{', '.join(s.value for s in PUBLIC_STATUSES)}")
    return JobStatus(status)


async def list_jobs(
    redis: RedisClient, keys: Keys, caller: Caller, *,
    limit: int = 50, cursor: str | None = None, status: str | None = None,
) -> JobPage:
    """The caller's jobs, newest first, one page."""
    after = _parse_cursor(cursor)
    wanted = check_status(status)
    index = keys.job_index(None if caller.admin else caller.owner)
    top: str = "+inf" if after is None else str(after[0])
    offset, scanned = 0, 0
    jobs: list[JobRecord] = []
    last: tuple[int, str] | None = None
    while len(jobs) < limit and scanned < MAX_SCAN:
        batch = await redis.zrange(index, top, "-inf", desc=True, byscore=True,
                                   withscores=True, offset=offset, num=limit + 1)
        if not batch:
            return JobPage(jobs, None)
        entries = [(m.decode(), int(s)) for m, s in batch]
        # Same-score ids come in descending order; those at or above the cursor's were sent.
        entries = [(m, s) for m, s in entries
                   if after is None or s < after[0] or m < after[1]]
        records = await _records(redis, keys, [m for m, _ in entries])
        gone = [m for (m, _), record in zip(entries, records, strict=True) if record is None]
        if gone:
            await redis.zrem(index, *gone)
        offset += len(batch) - len(gone)
        for (job_id, score), record in zip(entries, records, strict=True):
            scanned += 1
            last = (score, job_id)
            # A staged job is being submitted: not shown, and not gone either.
            if record is not None and record.status is not JobStatus.STAGED and visible(
                    record.owner, caller) and (
                    wanted is None or record.status is wanted):
                jobs.append(record)
            if len(jobs) >= limit:
                break
    next_cursor = f"{last[0]}-{last[1]}" if last is not None else None
    return JobPage(jobs, next_cursor)


async def _records(
    redis: RedisClient, keys: Keys, job_ids: list[str]
) -> list[JobRecord | None]:
    """Each job's record, or None where the job does not exist."""
    if not job_ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hgetall(keys.job(job_id))
        raw = await pipe.execute()
    return [JobRecord.from_hash(r) if r else None for r in raw]
