"""Pipeline statistics: queue depth and lag per lane, live workers, throughput.

Everything is read from Redis, so every server replica reports the same
numbers. Throughput comes from a counter the workers increment on each commit
(`keys.texts_counter`), sampled twice: texts/s is the difference over time
(None in the first sample, which has no earlier one: not a false 0).

A lane's lag is the age of its oldest chunk not yet delivered to a worker
(the entry after the group's last-delivered id), 0 when nothing waits.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, TypedDict

import orjson
from redis.exceptions import ResponseError

from pipeline.keys import GROUP
from pipeline.model.info import ModelInfo

if TYPE_CHECKING:
    from pipeline.keys import Keys, QueueLayout
    from pipeline.store.connections import RedisClient
    from pipeline.store.partitions import Partitions


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
    """The models live workers serve (sorted by name), with the backend a worker runs.

    A worker may deregister between any two reads: its row is then missing
    (skipped), and when none is left no HMGET is sent (Redis rejects one with no field).
    """
    alive = await live_workers(redis, keys)
    if not alive:
        return []
    backends: dict[str, str] = {}
    for raw in await redis.hmget(keys.workers, alive):
        if raw is not None:
            info = orjson.loads(raw)
            backends.setdefault(str(info.get("model")), str(info.get("backend") or ""))
    names = sorted(backends)
    if not names:
        return []
    found: list[ModelInfo] = []
    for name, raw in zip(names, await redis.hmget(keys.models, names), strict=True):
        if raw is not None:
            model = ModelInfo.from_json(raw)
            found.append(replace(model, backend=model.backend or backends[name]))
    return found


@dataclass(frozen=True)
class Lane:
    """One queue lane of one model: chunks waiting, chunks running, lag of the oldest."""

    model: str
    lane: str
    waiting: int = 0
    running: int = 0
    lag_s: float = 0.0


async def lane_state(redis: RedisClient, model: str, lane: str, stream: str) -> Lane:
    """The state of one queue stream."""
    try:
        groups = await redis.xinfo_groups(stream)
    except ResponseError:  # no such stream yet
        return Lane(model, lane)
    group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
    if group is None:
        return Lane(model, lane, int(await redis.xlen(stream)))
    lag = group.get("lag")
    waiting = int(lag) if lag is not None else int(await redis.xlen(stream))
    running = int(group["pending"])
    if waiting == 0:
        return Lane(model, lane, 0, running)
    last = group["last-delivered-id"].decode()
    oldest = await redis.xrange(stream, min=f"({last}", count=1)
    age = 0.0
    if oldest:
        ms = int(oldest[0][0].decode().split("-")[0])
        age = max(0.0, time.time() - ms / 1000)
    return Lane(model, lane, waiting, running, round(age, 3))


async def model_lanes(redis: RedisClient, model: str, layout: QueueLayout) -> list[Lane]:
    """A model's fast lane and its bulk lane (its partitions added up)."""
    fast = await lane_state(redis, model, "fast", layout.fast)
    parts = [await lane_state(redis, model, "bulk", stream) for stream in layout.bulks]
    bulk = Lane(model, "bulk", sum(p.waiting for p in parts), sum(p.running for p in parts),
                max(p.lag_s for p in parts))
    return [fast, bulk]


async def lanes(redis: RedisClient, keys: Keys, partitions: Partitions) -> list[Lane]:
    """Every lane of every registered model."""
    models = sorted(m.decode() for m in await redis.hkeys(keys.models))
    return [lane for model in models
            for lane in await model_lanes(redis, model, await partitions.layout(model))]


class WorkerDetail(TypedDict):
    """A live worker as it registered itself, with batches made and when it was last seen."""

    id: str
    model: str
    backend: str
    host: str
    pid: int
    started_at: float
    batches: int
    seen_s_ago: float


async def worker_details(redis: RedisClient, keys: Keys) -> list[WorkerDetail]:
    """Live workers as they describe themselves, with batches made and when last seen."""
    described = await redis.hgetall(keys.workers)
    if not described:
        return []
    ids = sorted(w.decode() for w in described)
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in ids:
            pipe.pttl(keys.heartbeat(worker_id))
            pipe.hget(keys.metrics, f"w:{worker_id}:batches")
        replies = await pipe.execute()
    now = time.time()
    found: list[WorkerDetail] = []
    for i, worker_id in enumerate(ids):
        ttl_ms, batches = replies[2 * i], replies[2 * i + 1]
        if ttl_ms is None or int(ttl_ms) < 0:  # no heartbeat: dead, or gone
            continue
        info = orjson.loads(described[worker_id.encode()])
        found.append(WorkerDetail(
            id=worker_id, model=str(info.get("model", "")), backend=str(info.get("backend", "")),
            host=str(info.get("host", "")), pid=int(info.get("pid", 0)),
            started_at=float(info.get("started_at", 0.0)), batches=int(batches or 0),
            seen_s_ago=round(max(0.0, now - float(info.get("seen_at", now))), 1)))
    return found


class StatsSnapshot(TypedDict):
    """One `stats` event of the feed (and the `/metrics` figures it shares)."""

    queued_chunks: int
    running_chunks: int
    workers: int
    texts_total: int
    texts_per_s: float | None
    lanes: list[dict[str, str | int | float]]
    worker_list: list[WorkerDetail]


class StatsSampler:
    """Computes a stats snapshot, with texts/s since the previous sample."""

    def __init__(self, redis: RedisClient, keys: Keys, partitions: Partitions) -> None:
        self.redis = redis
        self.keys = keys
        self.partitions = partitions
        self._last: tuple[float, int] | None = None

    async def sample(self) -> StatsSnapshot:
        """One snapshot: queue depth, workers, texts embedded and texts/s."""
        texts = int(await self.redis.get(self.keys.texts_counter) or 0)
        now = time.monotonic()
        rate: float | None = None
        if self._last is not None and now > self._last[0]:
            rate = round(max(0.0, (texts - self._last[1]) / (now - self._last[0])), 1)
        self._last = (now, texts)
        found = await lanes(self.redis, self.keys, self.partitions)
        workers = await worker_details(self.redis, self.keys)
        return {
            "queued_chunks": sum(x.waiting for x in found),
            "running_chunks": sum(x.running for x in found),
            "workers": len(workers),
            "texts_total": texts,
            "texts_per_s": rate,
            "lanes": [asdict(x) for x in found],
            "worker_list": workers,
        }
