"""The typed client (`pipeline.store.commands`) against redis-py and real servers.

`connect()` casts redis-py's clients to `RedisClient`, so mypy cannot check
the protocol against redis-py: these tests do. Every declared command exists
on both clients with the declared parameters, and each reply has the
declared shape on Valkey, on Redis 7 and on a cluster.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any, get_overloads, get_type_hints

import pytest
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript

from pipeline.store.commands import GroupInfo, RedisClient, RedisPipeline
from pipeline.store.connections import ClusterClient, ScriptLoadingPipeline, connect

pytestmark = pytest.mark.anyio
# One hash tag: on a cluster, multi-key commands and scripts need one slot.
S, H, Z, L, K = "{t}:stream", "{t}:hash", "{t}:zset", "{t}:list", "{t}:key"
SHAPES = "return {redis.call('HINCRBY', KEYS[1], 'n', 1), 'text', {1, ARGV[1]}, false}"


def declared(protocol: type) -> list[tuple[str, Callable[..., Any]]]:
    """The methods a protocol declares, each overload apart (context manager dunders too)."""
    return [(name, variant) for name, member in vars(protocol).items()
            if callable(member) and (not name.startswith("_") or name in ("__aenter__",
                                                                           "__aexit__"))
            for variant in get_overloads(member) or [member]]


@pytest.mark.parametrize(("protocol", "implementations"), [
    (RedisClient, (aioredis.Redis, ClusterClient)),
    (RedisPipeline, (Pipeline, ScriptLoadingPipeline)),
])
def test_every_declared_command_takes_the_declared_parameters_in_redis_py(
    protocol: type, implementations: tuple[type, ...]
) -> None:
    for name, member in declared(protocol):
        ours = list(inspect.signature(member).parameters.values())[1:]
        for implementation in implementations:
            theirs = inspect.signature(getattr(implementation, name)).parameters
            positional = [p.name for p in ours if p.kind is p.POSITIONAL_OR_KEYWORD]
            assert list(theirs)[1:len(positional) + 1] == positional, (implementation, name)
            if any(p.kind is p.VAR_POSITIONAL for p in ours):  # its name is never passed
                assert any(p.kind is p.VAR_POSITIONAL for p in theirs.values()), name
            for parameter in (p for p in ours if p.kind is not p.VAR_POSITIONAL):
                assert parameter.name in theirs, (implementation, name, parameter.name)
                kinds = (parameter.kind, parameter.POSITIONAL_OR_KEYWORD)
                assert theirs[parameter.name].kind in kinds, (implementation, name)


def test_a_script_takes_the_declared_parameters_in_redis_py() -> None:
    assert list(inspect.signature(AsyncScript.__call__).parameters) == [
        "self", "keys", "args", "client"]


@pytest.fixture
async def client(any_redis_url: str) -> AsyncIterator[RedisClient]:
    redis = connect(any_redis_url)
    yield redis
    await redis.aclose()


async def test_string_and_key_replies_have_the_declared_shapes(client: RedisClient) -> None:
    assert await client.ping() is True
    assert await client.set(K, b"1") is True
    assert await client.set(K, b"2", nx=True) is None
    assert await client.set(K, "3", ex=60) is True
    assert await client.get(K) == b"3"
    assert await client.get("{t}:missing") is None
    assert await client.incrby(K, 2) == 5
    assert await client.exists(K, "{t}:missing") == 1
    assert await client.delete(K, "{t}:missing") == 1
    async with client.pipeline(transaction=False) as pipe:
        assert pipe.set(K, b"1", px=60_000) is pipe  # queued: the pipeline comes back
        pipe.expire(K, 60)
        pipe.pttl(K)
        pipe.get(K)
        pipe.incrby(K, 1)
        pipe.exists(K)
        pipe.delete(K)
        replies = await pipe.execute()
    assert replies[:2] == [True, True]
    assert isinstance(replies[2], int) and replies[2] > 0
    assert replies[3:] == [b"1", 2, 1, 1]


async def test_hash_replies_have_the_declared_shapes(client: RedisClient) -> None:
    assert await client.hgetall(H) == {}
    async with client.pipeline(transaction=False) as pipe:
        pipe.hset(H, "a", b"x")
        pipe.hincrby(H, "n", 2)
        pipe.hincrbyfloat(H, "f", 0.5)
        pipe.hget(H, "a")
        pipe.hgetall(H)
        assert await pipe.execute() == [1, 2, 0.5, b"x", {b"a": b"x", b"n": b"2", b"f": b"0.5"}]
    assert await client.hget(H, "a") == b"x"
    assert await client.hget(H, "missing") is None
    assert sorted(await client.hkeys(H)) == [b"a", b"f", b"n"]
    assert await client.hmget(H, ["a", "missing"]) == [b"x", None]
    assert await client.hdel(H, "a", "missing") == 1


async def test_sorted_set_and_list_replies_have_the_declared_shapes(client: RedisClient) -> None:
    assert await client.zadd(Z, {"a": 1, b"b": 2.5}) == 2
    assert await client.zrange(Z, 0, -1) == [b"a", b"b"]
    assert await client.zrange(Z, "+inf", "-inf", desc=True, byscore=True, withscores=True,
                               offset=0, num=1) == [(b"b", 2.5)]
    async with client.pipeline(transaction=False) as pipe:
        pipe.zadd(Z, {"c": 3})
        pipe.zremrangebyscore(Z, "-inf", "(2")
        pipe.zcard(Z)
        pipe.rpush(L, b"v")
        pipe.expire(L, 60)
        assert await pipe.execute() == [1, 1, 2, 1, True]
    assert await client.zpopmin(Z, 1) == [(b"b", 2.5)]
    assert await client.zscore(Z, "c") == 3.0 and await client.zscore(Z, "missing") is None
    assert await client.zrem(Z, "c", "missing") == 1
    assert await client.blpop([L], timeout=1) == (L.encode(), b"v")


async def test_stream_replies_have_the_declared_shapes(client: RedisClient) -> None:
    first = await client.xadd(S, {"n": 1, b"k": b"v"}, maxlen=100, approximate=True)
    assert isinstance(first, bytes)
    async with client.pipeline(transaction=False) as pipe:
        pipe.xadd(S, {"n": 2})
        second = (await pipe.execute())[0]
    assert isinstance(second, bytes)
    assert await client.xlen(S) == 2
    assert await client.xrange(S, count=1) == [(first, {b"n": b"1", b"k": b"v"})]
    assert await client.xrevrange(S, count=1) == [(second, {b"n": b"2"})]
    assert await client.xrange(S, min=f"({second.decode()}") == []
    assert await client.xread({S: first}, count=10) == [[S.encode(), [(second, {b"n": b"2"})]]]
    assert await client.xread({S: second}, count=10, block=10) == []
    assert await client.xgroup_create(S, "g", id="0", mkstream=True) is True
    read = await client.xreadgroup("g", "c1", {S: ">"}, count=1)
    assert read == [[S.encode(), [(first, {b"n": b"1", b"k": b"v"})]]]
    assert await client.xreadgroup("g", "c1", {S: ">"}, count=10, block=10) != []
    assert await client.xreadgroup("g", "c1", {S: ">"}, count=10, block=10) == []
    await _check_pending_replies(client, first, second)


async def _check_pending_replies(client: RedisClient, first: bytes, second: bytes) -> None:
    hints = get_type_hints(GroupInfo)
    (group,) = await client.xinfo_groups(S)
    assert GroupInfo.__required_keys__ <= set(group) <= set(hints)
    assert all(isinstance(value, hints[key]) for key, value in group.items()), group
    assert group["name"] == b"g" and group["pending"] == 2
    (consumer,) = await client.xinfo_consumers(S, "g")
    assert consumer["name"] == b"c1" and consumer["pending"] == 2
    assert all(isinstance(value, int) for key, value in consumer.items() if key != "name")
    async with client.pipeline(transaction=False) as pipe:
        pipe.xpending_range(S, "g", min=first, max=first, count=1)
        (rows,) = await pipe.execute()
    assert [(r["message_id"], r["consumer"], r["times_delivered"]) for r in rows] == [
        (first, b"c1", 1)]
    assert isinstance(rows[0]["time_since_delivered"], int)
    assert await client.xclaim(S, "g", "c2", 0, [first], justid=True) == [first]
    claim = await client.xautoclaim(S, "g", "c2", 0, start_id="0-0", count=10)
    assert claim[0] == b"0-0" and len(claim) in (2, 3)
    assert claim[1] == [(first, {b"n": b"1", b"k": b"v"}), (second, {b"n": b"2"})]
    async with client.pipeline(transaction=False) as pipe:
        pipe.xack(S, "g", first, second)
        assert await pipe.execute() == [2]


async def test_script_replies_and_queued_scripts_have_the_declared_shapes(
    client: RedisClient
) -> None:
    script = client.register_script(SHAPES)
    # Lua: integers, bulk strings, nested tables; false is nil.
    assert await script(keys=[H], args=["x"]) == [1, b"text", [1, b"x"], None]
    async with client.pipeline(transaction=False) as pipe:
        await script(keys=[H], args=[2], client=pipe)
        pipe.hget(H, "n")
        assert await pipe.execute() == [[2, b"text", [1, b"2"], None], b"2"]
