"""Pipeline statistics: queue depth, live workers, throughput.

Everything is read from Redis, so every server replica reports the same
numbers. Throughput comes from a counter the workers increment on each commit
(`keys.texts_counter`), sampled twice: texts/s is the difference over time.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import ResponseError

from pipeline.keys import GROUP, LANES
from pipeline.models import ModelInfo

if TYPE_CHECKING:
    from pipeline.connections import RedisClient
    from pipeline.keys import Keys


async def live_workers(redis: RedisClient, keys: Keys) -> list[str]:
    """Ids of workers whose heartbeat has not expired."""
    worker_ids = [w.decode() for w in await redis.hkeys(keys.workers)]
    if not worker_ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in worker_ids:
            pipe.exists(keys.heartbeat(worker_id))
        alive = await pipe.execute()
    return [w for w, ok in zip(worker_ids, alive, strict=True) if ok]


async def served_models(redis: RedisClient, keys: Keys) -> list[ModelInfo]:
    """The models live workers serve (sorted by name), with the backend a worker runs."""
    alive = await live_workers(redis, keys)
    if not alive:
        return []
    backends: dict[str, str] = {}
    for raw in await redis.hmget(keys.workers, alive):
        if raw is not None:
            info = orjson.loads(raw)
            backends.setdefault(str(info.get("model")), str(info.get("backend") or ""))
    names = sorted(backends)
    found: list[ModelInfo] = []
    for name, raw in zip(names, await redis.hmget(keys.models, names), strict=True):
        if raw is not None:
            model = ModelInfo.from_json(raw)
            found.append(replace(model, backend=model.backend or backends[name]))
    return found


async def lane_depth(redis: RedisClient, stream: str) -> tuple[int, int]:
    """(waiting, in progress) entries of one queue stream."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream yet
        return 0, 0
    for group in groups:
        if group["name"] in (GROUP, GROUP.encode()):
            lag = group.get("lag")
            waiting = int(lag) if lag is not None else await redis.xlen(stream)
            return waiting, int(group["pending"])
    return int(await redis.xlen(stream)), 0


async def queue_depth(redis: RedisClient, keys: Keys) -> dict[str, int]:
    """Chunks waiting and in progress over every model's lanes."""
    models = [m.decode() for m in await redis.hkeys(keys.models)]
    waiting = in_progress = 0
    for model in models:
        for lane in LANES:
            w, p = await lane_depth(redis, keys.queue(model, lane))
            waiting += w
            in_progress += p
    return {"queued_chunks": waiting, "running_chunks": in_progress}


class StatsSampler:
    """Computes a stats snapshot, with texts/s since the previous sample."""

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._last: tuple[float, int] | None = None

    async def sample(self) -> dict[str, Any]:
        """One snapshot: queue depth, workers, texts embedded and texts/s."""
        texts = int(await self.redis.get(self.keys.texts_counter) or 0)
        now = time.monotonic()
        rate = 0.0
        if self._last is not None and now > self._last[0]:
            rate = max(0.0, (texts - self._last[1]) / (now - self._last[0]))
        self._last = (now, texts)
        workers = await live_workers(self.redis, self.keys)
        return {
            **await queue_depth(self.redis, self.keys),
            "workers": len(workers),
            "texts_total": texts,
            "texts_per_s": round(rate, 1),
        }
