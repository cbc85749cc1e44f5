"""Per-key quota of interactive requests in flight, counted over every server replica.

`EMBEDSTREAM_KEY_QUOTA_REQUESTS` bounds the interactive calls
(`/v1/embeddings`, MCP `embed` and `similarity`, `search_job`'s query) that
one API key has in flight at once, whether a call is answered as a request
or as a job. The trusted caller (owner "", API keys off) has no quota.

    <p>:inflight:<owner>   zset   slot id -> deadline (ms, Redis's clock)

Taking a slot is one script on that one key: drop the members whose
deadline passed, count the rest, add this one (and stretch the key's TTL
to its deadline). A call gives its slot back when it ends (ZREM), shielded
from the cancellation that may be ending it. Deliberate, so nobody "fixes"
it: a server that dies holding slots leaves members behind, which stop
counting at their deadline (the call's timeout plus `GRACE_S`) and go with
the key's TTL, so no slot is lost for longer than one call could last.
"""

from __future__ import annotations

import contextlib
import math
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from pipeline.errors import Overloaded
from pipeline.jobs.submitter import shielded

if TYPE_CHECKING:
    from pipeline.keys import Keys
    from pipeline.store.connections import RedisClient

GRACE_S = 5
RETRY_AFTER_S = 1

# KEYS: the owner's zset.  ARGV: limit, slot id, seconds the slot may be held.
# -1 when the slot is taken, else the slots already held (nothing added).
_TAKE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[1]) then return held end
local hold_ms = tonumber(ARGV[3]) * 1000
redis.call('ZADD', KEYS[1], now_ms + hold_ms, ARGV[2])
if redis.call('PTTL', KEYS[1]) < hold_ms then redis.call('PEXPIRE', KEYS[1], hold_ms) end
return -1
"""


class RequestQuota:
    """Counts each API key's interactive requests in flight (see the module docstring)."""

    def __init__(self, redis: RedisClient, keys: Keys, limit: int) -> None:
        self.redis = redis
        self.keys = keys
        self.limit = limit
        self._take = redis.register_script(_TAKE)

    @contextlib.asynccontextmanager
    async def held(self, owner: str, timeout_s: float) -> AsyncIterator[None]:
        """A slot of `owner`'s quota for the block; Overloaded when every slot is taken."""
        if not owner or self.limit <= 0:
            yield
            return
        key = self.keys.requests_in_flight(owner)
        slot = uuid.uuid4().hex
        held = int(await self._take(keys=[key], args=[
            self.limit, slot, math.ceil(timeout_s) + GRACE_S]))
        if held >= 0:
            raise Overloaded(
                f"this API key has {held} interactive requests in flight, its limit "
                f"(EMBEDSTREAM_KEY_QUOTA_REQUESTS={self.limit}); nothing was queued: retry "
                f"in {RETRY_AFTER_S} s, or wait for a request to finish",
                retry_after_s=RETRY_AFTER_S)
        try:
            yield
        finally:
            await shielded(self.redis.zrem(key, slot))
