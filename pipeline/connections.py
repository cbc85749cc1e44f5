"""Redis clients, configured the one way embedstream needs them.

RESP2 is pinned: RESP3 changes the shape of stream replies. Replies are
bytes (vectors are binary). Blocking reads (XREAD/XREADGROUP BLOCK) get a
client with no socket timeout, because redis-py's default timeout turns a
long BLOCK into a TimeoutError; every other command keeps a timeout so a
hung server is noticed.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

COMMAND_TIMEOUT_S = 10.0

# redis-py types every reply as a union over `decode_responses`; with bytes
# replies pinned here, code reads replies as bytes and decodes where it reads
# them, so the client is typed loosely at this one boundary.
RedisClient: TypeAlias = Any


def connect(url: str, *, blocking: bool = False, max_connections: int = 512) -> RedisClient:
    """A pooled asyncio client for `url`; `blocking=True` for BLOCK reads."""
    return aioredis.Redis.from_url(
        url,
        protocol=2,
        decode_responses=False,
        socket_timeout=None if blocking else COMMAND_TIMEOUT_S,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        max_connections=max_connections,
    )
