"""The live feed: job and worker lifecycle events for dashboards.

One capped stream (`keys.feed`) that every process appends to and every
dashboard reads with XREAD from its last event id, so a reconnecting
dashboard resumes with no gap (as long as it is within the cap). Vectors
never go here. Publishing is best effort: a feed event lost in a crash costs a
dashboard one update, never a result.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from pipeline.keys import Keys
    from pipeline.store.connections import RedisClient

logger = logging.getLogger(__name__)


async def append(
    redis: RedisClient, keys: Keys, event: str, data: dict[str, Any], *, maxlen: int = 10_000
) -> None:
    """Append one event to the feed (raises if Redis does not take it)."""
    await redis.xadd(keys.feed, {"type": event, "data": orjson.dumps(data)},
                     maxlen=maxlen, approximate=True)


async def publish(
    redis: RedisClient, keys: Keys, event: str, data: dict[str, Any], *, maxlen: int = 10_000
) -> None:
    """Append one event to the feed; never raises for a Redis hiccup."""
    try:
        await append(redis, keys, event, data, maxlen=maxlen)
    except RedisError:
        logger.warning("could not publish %s to the feed", event, exc_info=True)

