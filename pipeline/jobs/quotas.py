"""Per-key quotas: how much one API key may have waiting at once.

With API keys set, each key (its owner id) may have at most `key_quota_jobs`
unfinished jobs (`EMBEDSTREAM_KEY_QUOTA_JOBS`) and at most `key_quota_texts`
texts waiting in them (`EMBEDSTREAM_KEY_QUOTA_TEXTS`); 0 turns a quota off,
and the trusted caller (owner "", keys off) has none. Past one, a submission
is refused with `Overloaded` (429, with a time to come back) before anything
is queued, so one key's flood never fills the queue ahead of the others. A
job larger than the texts quota by itself can never be accepted: that is a
`PayloadTooLarge` (413), at the input that passes it.

The count heals itself, so nothing is decremented when a job ends and a
crash leaks nothing: `keys.owner_jobs(owner)` lists the owner's job ids
(a sorted set scored by a listing deadline), and each check reads every
listed job's status and counters in one pipeline, counting the unfinished
ones and pruning the finished ones. A submission lists its job at its first
check, before anything is written (so submissions racing each other count
each other), renews the deadline while its upload runs (`keep`), and unlists
it when abandoned. An id whose record does not exist is counted (as a job
of no known texts) until its deadline passes, then pruned: its uploader
died, or the job expired. The list expires when its owner goes idle.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from pipeline.errors import Overloaded, PayloadTooLarge
from pipeline.jobs.record import TERMINAL_STATUSES

if TYPE_CHECKING:
    from pipeline.jobs.backlog import Backlog
    from pipeline.keys import Keys
    from pipeline.settings import Settings
    from pipeline.store.connections import RedisClient

READ_BATCH = 500
_FINISHED = {s.value.encode() for s in TERMINAL_STATUSES}
_WAITING = ((b"total", 1), (b"done", -1), (b"failed", -1))  # texts a job still waits for


class KeyQuotas:
    """Checks a submission against its API key's quotas (see the module docstring)."""

    def __init__(self, redis: RedisClient, keys: Keys, settings: Settings,
                 backlog: Backlog) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.backlog = backlog

    def applies(self, owner: str) -> bool:
        """Whether `owner` has quotas: keys are set and some quota is on."""
        return bool(owner) and (self.settings.key_quota_jobs > 0
                                or self.settings.key_quota_texts > 0)

    def check_size(self, owner: str, total: int) -> None:
        """Raise PayloadTooLarge for a job that alone passes the texts quota."""
        limit = self.settings.key_quota_texts
        if owner and 0 < limit < total:
            raise PayloadTooLarge(
                f"a job of this API key holds at most {limit} inputs (its quota of texts "
                "waiting, EMBEDSTREAM_KEY_QUOTA_TEXTS); split it into smaller jobs")

    async def check(self, owner: str, job_id: str, adding: int) -> None:
        """List the job as the owner's and raise Overloaded if it passes a quota."""
        if not self.applies(owner):
            return
        self.check_size(owner, adding)
        await self.keep(owner, job_id)
        jobs, texts, least = await self.usage(owner, job_id)
        limit = self.settings.key_quota_jobs
        if 0 < limit <= jobs:
            retry_s = await self.backlog.retry_after_s(max(1, least))
            raise Overloaded(
                f"this API key has {jobs} unfinished jobs, the most it may have "
                f"(EMBEDSTREAM_KEY_QUOTA_JOBS={limit}); nothing was queued: retry in "
                f"{retry_s} s", retry_after_s=retry_s)
        limit = self.settings.key_quota_texts
        if 0 < limit < texts + adding:
            retry_s = await self.backlog.retry_after_s(texts + adding - limit)
            raise Overloaded(
                f"this API key has {texts} texts waiting in its unfinished jobs, and {adding} "
                f"more would pass its limit of {limit} (EMBEDSTREAM_KEY_QUOTA_TEXTS); nothing "
                f"was queued: retry in {retry_s} s", retry_after_s=retry_s)

    async def keep(self, owner: str, job_id: str) -> None:
        """List (or keep listed) the job of an upload still running."""
        if not self.applies(owner):
            return
        name = self.keys.owner_jobs(owner)
        async with self.redis.pipeline(transaction=False) as pipe:  # one key: one slot
            pipe.zadd(name, {job_id: time.time() + 2 * self.settings.staging_ttl_s})
            pipe.expire(name, math.ceil(self.settings.job_timeout_s + self.settings.result_ttl_s))
            await pipe.execute()

    async def release(self, owner: str, job_id: str) -> None:
        """Unlist a job that never became visible."""
        if self.applies(owner):
            await self.redis.zrem(self.keys.owner_jobs(owner), job_id)

    async def usage(self, owner: str, job_id: str) -> tuple[int, int, int]:
        """The owner's unfinished jobs (but `job_id`), their texts waiting, and the fewest
        texts any one of them still waits for; finished and dead entries are pruned."""
        name = self.keys.owner_jobs(owner)
        jobs = texts = 0
        least: int | None = None
        gone: list[bytes] = []
        start = 0
        while batch := await self.redis.zrange(name, start, start + READ_BATCH - 1,
                                               withscores=True):
            start += len(batch)
            async with self.redis.pipeline(transaction=False) as pipe:
                for member, _ in batch:
                    pipe.hgetall(self.keys.job(member.decode()))
                replies = await pipe.execute()
            now = time.time()
            for (member, deadline), raw in zip(batch, replies, strict=True):
                if raw.get(b"status") in _FINISHED or (not raw and deadline < now):
                    gone.append(member)
                elif member.decode() != job_id:
                    waiting = sum(int(raw.get(f, 0)) * sign for f, sign in _WAITING)
                    jobs, texts = jobs + 1, texts + waiting
                    least = waiting if least is None else min(least, waiting)
        if gone:
            await self.redis.zrem(name, *gone)
        return jobs, texts, least or 0
