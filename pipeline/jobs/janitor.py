"""The job janitor: no job waits forever, and every lifecycle event reaches the feed.

Any server and any worker runs `sweep_jobs` now and then (`janitor_interval_s`);
many may run at once, because every change it makes is one script that checks
the job's state itself (`time_out`, `claim_announcement`). Each pass walks the
whole index of active jobs (`keys.active_jobs`, added before a job can be
seen), oldest first, `SWEEP_PAGE_JOBS` records a round trip (`active_pages`), so
the newest of a million active jobs times out as surely as the oldest:

- a job whose record is gone (its staging expired, or its results did) is
  dropped from the index; a job id never comes back once its record is gone,
  so the drop cannot orphan a live job;
- a staged job is left to its submitter (its keys expire by themselves);
- a queued or running job gets its `job.created` announced if its submitter
  died before doing so, and is failed once it made no progress within its
  timeout, with a reason saying whether any live worker serves its model;
- a finished job gets its `job.created` and `job.<status>` announced if the
  processes that made those moves died before doing so, then leaves the index.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from pipeline.jobs.record import JobRecord, JobStatus
from pipeline.jobs.scripts import JobScripts, TimeOut, announce
from pipeline.store.stats import served_models
from pipeline.tasks import honour_cancel

if TYPE_CHECKING:
    from pipeline.settings import Settings
    from pipeline.store.commands import RedisClient

logger = logging.getLogger(__name__)

# Jobs read a round trip: a pass walks the whole index, a page at a time, so its memory
# and each round trip stay bounded however many jobs are active.
SWEEP_PAGE_JOBS = 1_000


@dataclass
class Sweep:
    """What one sweep did (for logs and tests)."""

    seen: int = 0
    timed_out: int = 0
    announced: int = 0
    dropped: int = 0
    # The models live workers serve, asked once a sweep, when a job first needs it.
    served: set[str] | None = field(default=None, repr=False, compare=False)


async def sweep_jobs(scripts: JobScripts, settings: Settings) -> Sweep:
    """One pass over every active job, a page at a time (see the module docstring)."""
    redis, keys = scripts.redis, scripts.keys
    sweep = Sweep()
    async for ids in active_pages(redis, keys.active_jobs, SWEEP_PAGE_JOBS):
        async with redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hgetall(keys.job(job_id))
            raws = await pipe.execute()
        for job_id, raw in zip(ids, raws, strict=True):
            sweep.seen += 1
            await _sweep_job(scripts, settings, job_id, raw, sweep)
    return sweep


async def active_pages(redis: RedisClient, index: str, size: int) -> AsyncIterator[list[str]]:
    """The members of a sorted set, oldest first, `size` at a time, up to today's newest.

    The cursor is the last (score, member) seen, not a position: members removed
    meanwhile (by this sweep or another process) shift no one past it, and
    members with equal scores, which Redis orders by member, are skipped by
    member. Members added past the newest score at the start wait for the next pass.
    """
    newest = await redis.zrange(index, -1, -1, withscores=True)
    if not newest:
        return
    score, member, offset = float("-inf"), b"", 0
    while True:
        page = await redis.zrange(index, repr(score), repr(newest[0][1]), byscore=True,
                                  offset=offset, num=size, withscores=True)
        fresh = [(m, s) for m, s in page if s > score or m > member]
        if fresh:
            yield [m.decode() for m, _ in fresh]
            (member, score), offset = fresh[-1], 0
        elif len(page) == size:  # a whole page of one score, all seen: look further on
            offset += size
            continue
        if len(page) < size:
            return


async def _sweep_job(scripts: JobScripts, settings: Settings, job_id: str,
                     raw: dict[bytes, bytes], sweep: Sweep) -> None:
    redis, keys = scripts.redis, scripts.keys
    if not raw:
        sweep.dropped += await redis.zrem(keys.active_jobs, job_id)
        return
    record = JobRecord.from_hash(raw)
    if record.status is JobStatus.STAGED:
        return
    # Created before finished, even for a job that ran its course unannounced.
    sweep.announced += await _announce(scripts, settings, record, "job.created", raw)
    if not record.finished:
        if sweep.served is None:
            sweep.served = {model.name for model in await served_models(redis, keys)}
        record = await _time_out(scripts, settings, record, record.model in sweep.served, sweep)
    if record.finished:
        event = f"job.{record.status.value}"
        sweep.announced += await _announce(scripts, settings, record, event, raw)
        if await redis.hget(keys.job(job_id), f"ann:{event}") in (b"done", None):
            sweep.dropped += await redis.zrem(keys.active_jobs, job_id)


async def _announce(scripts: JobScripts, settings: Settings, record: JobRecord, event: str,
                    raw: dict[bytes, bytes]) -> int:
    if raw.get(f"ann:{event}".encode()) == b"done":
        return 0
    return int(await announce(scripts, record.id, event, record.public(),
                              maxlen=settings.feed_maxlen))


async def _time_out(scripts: JobScripts, settings: Settings, record: JobRecord, served: bool,
                    sweep: Sweep) -> JobRecord:
    """Fail the job if it made no progress within its timeout; the record afterwards."""
    if served:
        reason = (f"no progress within the job's timeout of {record.timeout_s:g} s, though a "
                  f"live worker serves {record.model}")
    else:
        reason = (f"no live worker serves model {record.model}, and the job made no progress "
                  f"within its timeout of {record.timeout_s:g} s")
    if await scripts.time_out(record.id, settings.result_ttl_s, reason) is not TimeOut.FAILED:
        return record
    sweep.timed_out += 1
    logger.warning("job %s failed: %s", record.id, reason,
                   extra={"event": "job.failed", "job_id": record.id})
    raw = await scripts.redis.hgetall(scripts.keys.job(record.id))
    return JobRecord.from_hash(raw) if raw else record


async def run_janitor(scripts: JobScripts, settings: Settings, stop: asyncio.Event) -> None:
    """Sweep the active jobs every `janitor_interval_s` until `stop`.

    Stopped between sweeps, never cancelled inside one: a Redis command
    cancelled mid-reply can leave its connection so that closing the client hangs.
    """
    while not stop.is_set():
        honour_cancel()
        try:
            await sweep_jobs(scripts, settings)
        except RedisError:
            logger.warning("job janitor failed; retrying", exc_info=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.janitor_interval_s)
