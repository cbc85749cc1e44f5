"""Redis Cluster support, on a real three-primary Valkey cluster (tests/support/cluster.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ClusterCrossSlotError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError

from pipeline.inputs import Item, JobOptions
from pipeline.keys import GROUP, Keys
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.store.connections import ClusterClient, connect, is_cluster, stream_keys
from tests.support.cluster import ValkeyCluster

pytestmark = pytest.mark.anyio
KEYS = Keys("es")
# Touches two keys of one slot, the shape of every embedstream script.
BUMP = """
redis.call('HINCRBY', KEYS[1], 'n', 1)
return redis.call('XADD', KEYS[2], '*', 'n', ARGV[1])
"""


@pytest.fixture
async def client(cluster_url: str) -> AsyncIterator[Any]:
    redis = connect(cluster_url)
    yield redis
    await redis.aclose()


async def test_connect_detects_a_cluster_node_and_a_single_server(
    valkey_cluster: ValkeyCluster, redis_url: str
) -> None:
    valkey_cluster.flush()
    for url in valkey_cluster.urls:  # any node will do
        redis = connect(url)
        try:
            assert is_cluster(redis)
            await redis.set("greeting", "hello")
            assert await redis.get("greeting") == b"hello"  # bytes replies, as on one server
        finally:
            await redis.aclose()
    single = connect(redis_url)
    try:
        assert not is_cluster(single)
        assert await single.ping()
    finally:
        await single.aclose()


async def test_jobs_spread_over_every_node_and_each_jobs_keys_share_one(
    valkey_cluster: ValkeyCluster, cluster_url: str, tmp_path: Path
) -> None:
    pipeline = Pipeline(Settings(redis_url=cluster_url, data_dir=tmp_path, chunk_size=2))
    try:
        jobs = [await pipeline.submit([Item(f"text {i}"), Item("more"), Item("and more")],
                                      JobOptions()) for i in range(12)]
    finally:
        await pipeline.close()
    nodes: set[int] = set()
    for job in jobs:
        written = [KEYS.job(job.id), KEYS.inputs(job.id)]
        homes = {valkey_cluster.node_of_key(key) for key in written}
        assert len(homes) == 1
        home = homes.pop()
        with valkey_cluster.node(home) as node:
            assert node.exists(*written) == 2  # really stored on that node
        nodes.add(home)
    assert nodes == {0, 1, 2}


async def test_a_registered_script_runs_in_a_pipeline_over_every_node_even_after_noscript(
    valkey_cluster: ValkeyCluster, client: Any
) -> None:
    bump = client.register_script(BUMP)
    job_ids = [f"{i:032x}" for i in range(9)]
    assert len({valkey_cluster.node_of_key(KEYS.job(j)) for j in job_ids}) > 1
    for round_ in range(2):
        async with client.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                await bump(keys=[KEYS.job(job_id), KEYS.events(job_id)], args=[round_],
                           client=pipe)
            replies = await pipe.execute()
        assert all(isinstance(reply, bytes) for reply in replies)  # stream ids
        for index in range(valkey_cluster.size):  # a restart or failover forgets scripts
            with valkey_cluster.node(index) as node:
                node.script_flush()
    assert [int(await client.hget(KEYS.job(j), "n")) for j in job_ids] == [2] * len(job_ids)
    assert await bump(keys=[KEYS.job(job_ids[0]), KEYS.events(job_ids[0])], args=[9])


async def test_a_blocking_read_waits_for_an_entry_on_its_streams_node(
    valkey_cluster: ValkeyCluster, cluster_url: str
) -> None:
    blocking = connect(cluster_url, blocking=True)
    writer = connect(cluster_url)
    stream = KEYS.events("ab" * 16)
    first = await writer.xadd(stream, {"type": "result"})
    try:
        reader = asyncio.create_task(blocking.xread({stream: first}, count=1, block=30_000))
        with valkey_cluster.node(valkey_cluster.node_of_key(stream)) as home:
            deadline = time.monotonic() + 10
            while int(home.info("clients")["blocked_clients"]) < 1:
                assert time.monotonic() < deadline and not reader.done(), "the read never blocked"
                await asyncio.sleep(0.02)
        second = await writer.xadd(stream, {"type": "end"})
        reply = await asyncio.wait_for(reader, 10)
        assert reply[0][0] == stream.encode() and reply[0][1][0][0] == second
    finally:
        await blocking.aclose()
        await writer.aclose()


async def test_one_group_read_covers_both_lanes_of_a_model(client: Any) -> None:
    fast, bulk = KEYS.queues("all-MiniLM-L6-v2")
    for stream in (fast, bulk):
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        await client.xadd(stream, {"job": "x", "chunk": 0})
    reply = await client.xreadgroup(GROUP, "w1", {fast: ">", bulk: ">"}, count=10)
    assert sorted(name for name, _ in reply) == sorted([fast.encode(), bulk.encode()])


async def test_reading_streams_of_two_slots_at_once_is_refused_loudly(client: Any) -> None:
    # Refused by the client once it knows the slots, else by the node (CROSSSLOT).
    for _ in range(2):
        with pytest.raises((RedisClusterException, ClusterCrossSlotError)):
            await client.xread({KEYS.events("a" * 32): "0", KEYS.feed: "0"})


def test_stream_keys_are_the_first_half_after_streams() -> None:
    assert stream_keys(["COUNT", 5, "BLOCK", 10, "STREAMS", "a", "b", "0", "$"]) == ["a", "b"]
    assert stream_keys([b"GROUP", b"g", b"c", b"streams", b"q", b">"]) == [b"q"]
    assert stream_keys(["COUNT", 1]) == []


async def test_an_unreachable_cluster_is_a_connection_error() -> None:
    # Nothing listens on port 1: the cluster client cannot find a node.
    redis = ClusterClient.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        with pytest.raises(RedisConnectionError):
            await redis.get("anything")
    finally:
        await redis.aclose()
