"""The inbox: replies to a server's interactive requests, read by one reader per process.

Waiting requests cost a future each, not a Redis connection; a reply pushed
twice is read once; a reply to a caller that left is dropped; a reader that
loses its connection resumes where it was; an older server's request (no
inbox) is still answered on its reply list.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import pytest

from pipeline.inputs import Item, JobOptions
from pipeline.jobs.inbox import INBOX_MAXLEN
from pipeline.jobs.interactive import Reply, queue_reply
from pipeline.jobs.tenants import Caller, owner_id
from pipeline.keys import GROUP, Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import COMMAND_CONNECTIONS, Pipeline
from pipeline.settings import Settings
from pipeline.store.connections import connect_sync
from pipeline.tasks import cancel_and_wait
from tests.support.fakes import HashEmbedder, expected_vector
from tests.support.timings import quick
from tests.support.workers import create_groups, poll, running

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
FAST = KEYS.queue(DEFAULT_MODEL, "fast")
DIMS = 384
WAITING = 200


def connections(url: str) -> int:
    """Clients connected to the server now (CLIENT LIST), this probe's own included."""
    with connect_sync(url) as probe:
        return len(probe.client_list())


async def ask(pipeline: Pipeline, texts: list[str]) -> list[asyncio.Task[Any]]:
    """One waiting request per text, each sent before this returns."""
    tasks = [asyncio.create_task(pipeline.embed([Item(t)], JobOptions())) for t in texts]
    await poll(lambda: _queued(pipeline, len(texts)))
    return tasks


async def _queued(pipeline: Pipeline, n: int) -> bool:
    return bool(await pipeline.redis.xlen(FAST) >= n and pipeline.inbox.waiting >= n)


async def ghost_claims_everything(pipeline: Pipeline) -> None:
    """A consumer takes every waiting request and is never heard of again."""
    assert await pipeline.redis.xreadgroup(GROUP, "ghost", {FAST: ">"}, count=100_000)


async def test_waiting_requests_hold_one_redis_connection_while_another_completes(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    assert fast_settings.redis_url
    # The ghost's requests stay pending for the test's length: no peer reclaims them.
    settings = fast_settings.replace(visibility_timeout_s=300.0)
    await create_groups(pipeline.redis)
    before = connections(fast_settings.redis_url)
    waiting = await ask(pipeline, [f"tenant b query {i}" for i in range(WAITING)])
    held = connections(fast_settings.redis_url) - before
    # The inbox reader's one connection, and at most the command pool's.
    assert held <= COMMAND_CONNECTIONS + 1, held
    await ghost_claims_everything(pipeline)
    async with running(settings, HashEmbedder(settings)):
        with anyio.fail_after(10):
            answered = await pipeline.embed([Item("tenant a query")], JobOptions())
    assert answered.rows[0]["embedding"] == pytest.approx(
        expected_vector("tenant a query", DIMS), abs=1e-6)
    assert not any(task.done() for task in waiting)
    for task in waiting:
        await cancel_and_wait(task)
    assert pipeline.inbox.waiting == 0


async def test_a_reply_pushed_twice_is_read_once(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    await create_groups(pipeline.redis)
    (asked,) = await ask(pipeline, ["answered twice"])
    [[_, [(_, fields)]]] = await pipeline.redis.xreadgroup(GROUP, "ghost", {FAST: ">"}, count=1)
    request_id = fields[b"req"].decode()
    # A worker replied and died before its XACK; a peer reclaimed the entry and replied again.
    async with running(fast_settings, HashEmbedder(fast_settings)):
        with anyio.fail_after(10):
            first = await asked
        reply = Reply(b'{"n": 1, "dims": 384, "tokens": 1}', b"\0" * 4 * DIMS)
        async with pipeline.redis.pipeline(transaction=False) as pipe:
            queue_reply(pipe, KEYS, request_id, reply, pipeline.server_id)
            await pipe.execute()
        with anyio.fail_after(10):
            again = await pipeline.embed([Item("asked after")], JobOptions())
    assert first.rows[0]["embedding"] == pytest.approx(
        expected_vector("answered twice", DIMS), abs=1e-6)
    assert again.rows[0]["embedding"] == pytest.approx(
        expected_vector("asked after", DIMS), abs=1e-6)
    assert pipeline.inbox.waiting == 0


async def test_a_caller_that_leaves_holds_no_waiter_and_its_late_reply_is_dropped(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    await create_groups(pipeline.redis)
    (left,) = await ask(pipeline, ["nobody waits for this"])
    await cancel_and_wait(left)
    assert pipeline.inbox.waiting == 0
    async with running(fast_settings, HashEmbedder(fast_settings)):
        await poll(lambda: _answered(pipeline))
        with anyio.fail_after(10):
            still = await pipeline.embed([Item("still served")], JobOptions())
    assert still.status == "completed"
    assert pipeline.inbox.waiting == 0


async def _answered(pipeline: Pipeline) -> bool:
    return bool((await pipeline.redis.xpending(FAST, GROUP))["pending"] == 0
                and await pipeline.redis.xlen(FAST) >= 1)


async def test_a_reply_sent_while_the_inbox_reader_reconnects_is_not_lost(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    assert fast_settings.redis_url
    await create_groups(pipeline.redis)
    (asked,) = await ask(pipeline, ["across a lost connection"])
    with connect_sync(fast_settings.redis_url) as admin:
        readers = [c for c in admin.client_list() if c.get("cmd") == "xread"]
        assert readers
        for client in readers:
            admin.client_kill_filter(_id=client["id"])
    async with running(fast_settings, HashEmbedder(fast_settings)):
        with anyio.fail_after(10):
            answered = await asked
    assert answered.rows[0]["embedding"] == pytest.approx(
        expected_vector("across a lost connection", DIMS), abs=1e-6)


async def test_an_inbox_keeps_only_unread_replies_and_expires(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    async with running(fast_settings, HashEmbedder(fast_settings)):
        with anyio.fail_after(10):
            for i in range(5):
                await pipeline.embed([Item(f"query {i}")], JobOptions())
    inbox = KEYS.inbox(pipeline.server_id)
    assert await pipeline.redis.xlen(inbox) <= 1 < INBOX_MAXLEN
    assert 0 < await pipeline.redis.ttl(inbox) <= 120


async def test_an_older_servers_request_is_answered_on_its_reply_list(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    await create_groups(pipeline.redis)
    info = await pipeline.model(JobOptions())
    older = type(pipeline.requests.sender)(pipeline.redis, 0, fast_settings.chunk_size)
    request_id = await older.send(FAST, [Item("from an older server")], {
        "model": info.name, "normalize": True, "dimensions": DIMS, "model_dimensions": DIMS,
        "prompt": "", "chunk": False, "chunk_overlap": 0, "owner": ""})
    assert isinstance(request_id, str)
    async with running(fast_settings, HashEmbedder(fast_settings)):
        answer = await pipeline.blocking.blpop([KEYS.reply(request_id)], timeout=10)
    assert answer is not None
    assert Reply.unpack(answer[1]).tokens > 0


async def test_requests_of_two_servers_are_answered_through_their_inboxes_on_a_cluster(
    cluster_url: str, tmp_path: Any
) -> None:
    settings = quick(Settings(redis_url=cluster_url, data_dir=tmp_path / "data",
                              key_prefix="es", api_keys=("cluster-key",)))
    servers = [Pipeline(settings), Pipeline(settings)]
    caller = Caller(owner_id("cluster-key"))
    try:
        async with running(settings, HashEmbedder(settings)):
            with anyio.fail_after(15):
                answers = await asyncio.gather(*(
                    server.embed([Item(f"server {i} query")], JobOptions(), caller=caller)
                    for i, server in enumerate(servers) for _ in range(3)))
        assert [a.status for a in answers] == ["completed"] * 6
        assert all(server.inbox.waiting == 0 for server in servers)
    finally:
        for server in servers:
            await server.close()
