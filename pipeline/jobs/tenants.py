"""Tenants: who is calling, and the one check that decides which jobs they may see.

Every job records the owner id of the API key that created it (a digest of
the key, never the key). A caller sees a job when it is an admin (an
`EMBEDSTREAM_ADMIN_KEYS` key, or anyone when keys are off) or when it owns
the job. Every surface (REST, SSE, the feed, the job list, MCP tools,
resources and subscriptions) goes through `visible` / `check_visible`, so a
key that did not create a job gets `JobNotFound`, exactly as if it did not
exist: another tenant's job ids are not even confirmed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import JobNotFound

if TYPE_CHECKING:
    from pipeline.keys import Keys
    from pipeline.store.connections import RedisClient


def owner_id(key: str) -> str:
    """A stable, non-reversible id for an API key."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: the owner id its jobs get, and whether it sees every job."""

    owner: str
    admin: bool = False


# Keys off (loopback only, or --insecure): one trusted tenant that sees everything.
TRUSTED = Caller("", admin=True)


def visible(owner: str | None, caller: Caller) -> bool:
    """Whether `caller` may see a job owned by `owner` (None: the job is gone)."""
    if owner is None:
        return False
    return caller.admin or owner == caller.owner


def check_visible(job_id: str, owner: str | None, caller: Caller) -> None:
    """Raise JobNotFound unless `caller` may see the job."""
    if not visible(owner, caller):
        raise JobNotFound(f"job {job_id} does not exist or has expired")


class OwnerCache:
    """Job id -> owner id, read from the job record once per process (owners never change).

    The feed's job events carry no owner; filtering them per subscriber would
    cost an HGET per event per subscriber without this. Bounded: the oldest
    entries are forgotten first. A job that does not exist is not cached, so
    an event that overtakes its job's record is checked again next time.
    """

    def __init__(self, redis: RedisClient, keys: Keys, max_entries: int = 100_000) -> None:
        self.redis = redis
        self.keys = keys
        self.max_entries = max_entries
        self._owners: dict[str, str] = {}

    async def owner(self, job_id: str) -> str | None:
        """The job's owner id, or None when the job does not exist."""
        cached = self._owners.get(job_id)
        if cached is not None:
            return cached
        raw = await self.redis.hget(self.keys.job(job_id), "owner")
        if raw is None:
            return None
        if len(self._owners) >= self.max_entries:
            del self._owners[next(iter(self._owners))]
        owner: str = raw.decode()
        self._owners[job_id] = owner
        return owner

    async def may_see(self, event: str, data: object, caller: Caller) -> bool:
        """Whether a feed event is for `caller`'s eyes (job events: its own jobs only)."""
        if caller.admin or not event.startswith("job."):
            return True
        job_id = data.get("id") if isinstance(data, dict) else None
        return isinstance(job_id, str) and visible(await self.owner(job_id), caller)
