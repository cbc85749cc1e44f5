"""Fan-out: one Redis reader per stream per process, bounded buffers, resume without gaps.

Followers run as tasks in the test's loop against a real Valkey; `INFO
clients` tells how many connections are blocked in a read, which is the
number of readers the process runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import anyio
import pytest

from pipeline.jobs.events import Event
from pipeline.keys import Keys
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.store import feed
from pipeline.store.connections import connect
from pipeline.store.fanout import Entry, StreamHub, SubscriberDropped

pytestmark = pytest.mark.anyio
KEYS = Keys("es")


@pytest.fixture
async def pipeline(settings: Settings) -> AsyncIterator[Pipeline]:
    running = Pipeline(settings.replace(block_ms=200, stats_interval_s=0.2))
    try:
        yield running
    finally:
        await running.close()


async def blocked_clients(redis: Any) -> int:
    return int((await redis.info("clients"))["blocked_clients"])


async def collect(follower: Any, names: set[str], want: int, out: list[Event]) -> None:
    async with aclosing(follower):
        async for event in follower:
            if event.name in names:
                out.append(event)
                if len(out) == want:
                    return


async def test_a_hundred_feed_followers_share_one_blocking_reader_and_one_stats_sampler(
    pipeline: Pipeline
) -> None:
    seen: list[list[Event]] = [[] for _ in range(100)]
    stats: list[Event] = []
    async with anyio.create_task_group() as tasks:
        for out in seen:
            tasks.start_soon(collect, pipeline.follow_feed(replay=0), {"worker.up"}, 3, out)
        tasks.start_soon(collect, pipeline.follow_feed(replay=0), {"stats"}, 3, stats)
        with anyio.fail_after(10):
            while len(getattr(pipeline.hubs.find(KEYS.feed), "subscriptions", ())) < 101:
                await anyio.sleep(0.01)
            while (blocked := await blocked_clients(pipeline.redis)) == 0:
                await anyio.sleep(0.01)  # between two reads
            assert blocked == 1
            for n in range(3):
                await feed.publish(pipeline.redis, KEYS, "worker.up", {"id": f"w{n}"})
    assert all([e.data["id"] for e in out] == ["w0", "w1", "w2"] for out in seen)
    # One sampler: every follower is handed the same sample objects.
    assert len({id(event.data) for event in stats}) == 3


async def test_a_subscriber_that_falls_behind_is_dropped_alone(settings: Settings) -> None:
    assert settings.redis_url
    redis, blocking = connect(settings.redis_url), connect(settings.redis_url, blocking=True)
    hub = StreamHub(redis, blocking, "es:test-stream", block_ms=100, buffer=8)
    try:
        await hub.ready()
        slow, fast = hub.subscribe(), hub.subscribe()
        got: list[Entry] = []
        for n in range(40):
            await redis.xadd("es:test-stream", {"n": n})
            with anyio.fail_after(5):
                entry = await fast.get()
            assert entry is not None
            got.append(entry)
        assert [int(e.fields["n"]) for e in got] == list(range(40))
        assert slow.dropped and slow not in hub.subscriptions and fast in hub.subscriptions
        with pytest.raises(SubscriberDropped):
            await slow.get()
    finally:
        await hub.close()
        await redis.aclose()
        await blocking.aclose()


async def test_a_follower_resuming_behind_the_hub_reads_the_gap_then_live_without_repeats(
    pipeline: Pipeline
) -> None:
    ids = [await pipeline.redis.xadd(KEYS.feed, {"type": "worker.up", "data": f'{{"n": {n}}}'})
           for n in range(10)]
    hub = pipeline.hubs.hub(KEYS.feed)
    await hub.ready()
    keeper = hub.subscribe()  # keeps the hub reading while the follower catches up
    got: list[int] = []

    async def follow() -> None:
        async with aclosing(pipeline.follow_feed(ids[3].decode())) as events:
            async for event in events:
                if event.name == "worker.up":
                    got.append(event.data["n"])
                    if len(got) == 9:
                        return

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(follow)
            while len(got) < 6:
                await anyio.sleep(0.01)
            for n in range(10, 13):
                await pipeline.redis.xadd(KEYS.feed, {"type": "worker.up",
                                                      "data": f'{{"n": {n}}}'})
    assert got == list(range(4, 13))
    hub.unsubscribe(keeper)


async def test_the_reader_stops_when_its_last_follower_leaves(pipeline: Pipeline) -> None:
    stats: list[Event] = []
    await collect(pipeline.follow_feed(replay=0), {"stats"}, 1, stats)
    with anyio.fail_after(5):
        while pipeline.hubs.active:
            await asyncio.sleep(0.02)
    assert await blocked_clients(pipeline.redis) == 0
