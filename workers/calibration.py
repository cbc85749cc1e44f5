"""Recording a model's calibration vectors, which fix its int8/uint8 ranges.

The first worker of a model to start embeds the calibration corpus shipped
in `pipeline/data/` and records the raw vectors (`SET NX`, so later workers,
even on other hardware or backends, never replace them: every server then
quantizes with the same ranges). A worker that finds them recorded does
nothing. Failing to record is logged, not fatal: only int8/uint8 reads need
them, and they say so.

The `worker` command does this beside its loop (unless
`EMBEDSTREAM_CALIBRATE=0`), so a worker serves from the start; of several
workers of a model starting together, only the one that takes the lock
(`SET NX` with a TTL, so a worker killed while calibrating does not block the
next) embeds the corpus. A `Worker` built in-process does not calibrate, so
an embedder under test sees only the texts of its jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from pipeline import Keys
from pipeline.jobs import calibration_texts, has_calibration, store_calibration
from pipeline.store import connect

if TYPE_CHECKING:
    from pipeline import Settings
    from pipeline.model import Embedder
    from pipeline.store import RedisClient

logger = logging.getLogger(__name__)


LOCK_TTL_S = 600


async def ensure_calibration(redis: RedisClient, keys: Keys, embedder: Embedder) -> None:
    """Embed and record the calibration corpus for the embedder's model, once per Redis."""
    model = embedder.info.name
    if await has_calibration(redis, keys, model):
        return
    lock = keys.calibration_lock(model)
    if not await redis.set(lock, b"1", nx=True, ex=LOCK_TTL_S):
        return  # another worker of this model is recording it now
    started = time.perf_counter()
    try:
        embedded = await asyncio.to_thread(embedder.embed, list(calibration_texts()))
    except Exception:
        logger.exception("could not embed the calibration corpus for %s; int8/uint8 reads "
                         "of its jobs will be refused until a worker records it", model)
        await redis.delete(lock)
        return
    won = await store_calibration(redis, keys, model, embedded.vectors)
    await redis.delete(lock)
    logger.info("calibration vectors for %s %s in %.1fs", model,
                "recorded" if won else "already recorded by another worker",
                time.perf_counter() - started)


async def calibrate(settings: Settings, embedder: Embedder) -> None:
    """`ensure_calibration` on a connection of its own (the `worker` command's first step)."""
    assert settings.redis_url, "calibration needs a Redis URL"
    redis = connect(settings.redis_url)
    try:
        await ensure_calibration(redis, Keys(settings.key_prefix), embedder)
    finally:
        await redis.aclose()
