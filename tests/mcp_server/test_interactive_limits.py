"""Limits on `/v1/embeddings`: a client that hangs up stops its work, every job it makes
counts against the backlog, and one API key holds at most its quota of requests in flight.

The hang-up tests run the app on a real socket (only a real client can hang
up) with a slow fake worker in the test process, and look at the server's
own `Pipeline` for what it still waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import orjson
import pytest

import tests.support.live_server as live
from mcp_server.app import create_app
from pipeline import Item, parse_options
from pipeline.jobs.record import no_step
from pipeline.jobs.tenants import owner_id
from pipeline.keys import GROUP, Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder, SlowEmbedder
from tests.support.rest import assert_error, serving, submit
from tests.support.timings import quick
from tests.support.workers import create_groups, poll, running

pytestmark = pytest.mark.anyio
KEYS = Keys("es")
FAST = KEYS.queue(DEFAULT_MODEL, "fast")
KEY_A, KEY_B = "tenant-a-key-0123456789", "tenant-b-key-0123456789"
QUOTA = 3


@pytest.fixture
def quick_settings(settings: Settings) -> Settings:
    return quick(settings)


@pytest.fixture
async def pipeline(quick_settings: Settings) -> AsyncIterator[Pipeline]:
    """The test's own Pipeline (the server's lives in the server's thread)."""
    service = Pipeline(quick_settings)
    try:
        yield service
    finally:
        await service.close()


@contextlib.contextmanager
def live_app(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Any]]:
    """The app on a loopback socket; yields (host, port) and the server's Pipeline."""
    apps: list[Any] = []

    def keep(*args: Any, **kwargs: Any) -> Any:
        apps.append(create_app(*args, **kwargs))
        return apps[-1]

    monkeypatch.setattr(live, "create_app", keep)
    with live.live_server(settings, with_mcp=False) as base:
        yield base.removeprefix("http://"), apps[0].state.pipeline


async def hang_up_after(address: str, body: dict[str, Any], sent: Any) -> None:
    """POST /v1/embeddings on a raw socket, wait until `sent()` is true, then hang up."""
    host, port = address.split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    payload = orjson.dumps(body)
    writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: " + address.encode()
                 + b"\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    await writer.drain()
    await poll(sent)
    writer.close()
    await writer.wait_closed()


async def test_a_client_that_hangs_up_leaves_no_reply_waiter(
    quick_settings: Settings, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    with live_app(quick_settings, monkeypatch) as (address, server):
        async with running(quick_settings, SlowEmbedder(quick_settings, delay_s=3.0)):
            async def waiting() -> bool:
                return bool(server.inbox.waiting == 1)

            await hang_up_after(address, {"input": ["a question nobody waits for"]}, waiting)
            with anyio.fail_after(2):
                while server.inbox.waiting:
                    await anyio.sleep(0.02)


async def test_a_client_that_hangs_up_cancels_the_job_made_for_it(
    quick_settings: Settings, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"one of many texts {i}" for i in range(quick_settings.fast_lane_max_texts + 1)]
    with live_app(quick_settings, monkeypatch) as (address, server):
        async with running(quick_settings, SlowEmbedder(quick_settings, delay_s=3.0)):
            async def job_made() -> bool:
                return bool(await pipeline.redis.zcard(KEYS.job_index(None)))

            await hang_up_after(address, {"input": texts}, job_made)
            [job_id] = [m.decode() for m in
                        await pipeline.redis.zrange(KEYS.job_index(None), 0, -1)]
            with anyio.fail_after(2):
                while (await pipeline.job(job_id)).status != "cancelled":
                    await anyio.sleep(0.02)
            with anyio.fail_after(2):  # its hub stops within one block_ms
                while server.hubs.find(KEYS.events(job_id)) is not None:
                    await anyio.sleep(0.02)


@pytest.fixture
def limited(settings: Settings) -> Settings:
    return settings.replace(chunk_size=4, fast_lane_max_texts=4, max_backlog=8,
                            interactive_backlog=8, embed_timeout_s=2.0)


async def test_jobs_made_for_embeddings_count_against_the_backlog(limited: Settings) -> None:
    async with serving(limited) as http:
        await submit(http, [f"t{i}" for i in range(8)])  # the backlog is full (bulk lane)
        many = await http.post("/v1/embeddings", json={"input": [f"q{i}" for i in range(5)]})
        exact = await http.post("/v1/embeddings", json={"input": ["q"], "truncate": False})
        jobs = (await http.get("/v1/jobs")).json()["jobs"]
    for refused in (many, exact):
        assert_error(refused, 429, "overloaded", "the limit for jobs is 8", "retry in")
        assert 1 <= int(refused.headers["retry-after"]) <= 3600
    assert len(jobs) == 1


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(settings: Settings) -> Settings:
    """API keys on, a quota of 3 requests, and no peer reclaiming a stuck request in time."""
    return settings.replace(api_keys=(KEY_A, KEY_B), key_quota_requests=QUOTA,
                            block_ms=100, heartbeat_interval_s=0.2, heartbeat_ttl_s=1.0,
                            visibility_timeout_s=300.0)


async def test_a_key_at_its_request_quota_is_429_while_another_keys_request_completes(
    keyed: Settings, pipeline: Pipeline
) -> None:
    in_flight_b = KEYS.requests_in_flight(owner_id(KEY_B))
    await create_groups(pipeline.redis)
    async with serving(keyed) as http:
        held = [asyncio.create_task(http.post("/v1/embeddings", headers=auth(KEY_B),
                                              json={"input": f"b's question {i}"}))
                for i in range(QUOTA)]

        async def all_queued() -> bool:
            return bool(await pipeline.redis.xlen(FAST) == QUOTA)

        await poll(all_queued)
        # A worker takes B's requests and sits on them (a slow model, a stuck worker).
        claimed = await pipeline.redis.xreadgroup(GROUP, "stuck", {FAST: ">"}, count=100)
        owners = {orjson.loads(fields[b"options"])["owner"] for _, fields in claimed[0][1]}
        assert owners == {owner_id(KEY_B)}
        refused = await http.post("/v1/embeddings", headers=auth(KEY_B), json={"input": "more"})
        async with running(keyed, HashEmbedder(keyed)):
            with anyio.fail_after(10):
                answered = await http.post("/v1/embeddings", headers=auth(KEY_A),
                                           json={"input": "a's question"})
        assert await pipeline.redis.zcard(in_flight_b) == QUOTA
        assert not any(task.done() for task in held)
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
    assert_error(refused, 429, "overloaded", "EMBEDSTREAM_KEY_QUOTA_REQUESTS", "retry in")
    assert refused.headers["retry-after"] == "1"
    assert answered.status_code == 200, answered.text
    assert await pipeline.redis.zcard(in_flight_b) == 0


async def test_slots_a_dead_server_held_stop_counting_at_their_deadline(
    keyed: Settings, pipeline: Pipeline
) -> None:
    in_flight_b = KEYS.requests_in_flight(owner_id(KEY_B))
    seconds, micros = await pipeline.redis.time()
    soon_ms = seconds * 1000 + micros // 1000 + 300
    await pipeline.redis.zadd(in_flight_b, {f"dead-server-slot-{i}": soon_ms
                                            for i in range(QUOTA)})
    async with serving(keyed) as http, running(keyed, HashEmbedder(keyed)):
        refused = await http.post("/v1/embeddings", headers=auth(KEY_B), json={"input": "b"})
        await anyio.sleep(0.3)  # reason: the slots' deadline is a time, not an event
        with anyio.fail_after(10):
            answered = await http.post("/v1/embeddings", headers=auth(KEY_B),
                                       json={"input": "b"})
    assert_error(refused, 429, "overloaded", "EMBEDSTREAM_KEY_QUOTA_REQUESTS")
    assert answered.status_code == 200, answered.text
    assert await pipeline.redis.zcard(in_flight_b) == 0


async def test_the_trusted_caller_has_no_request_quota(
    settings: Settings, pipeline: Pipeline
) -> None:
    trusted = settings.replace(key_quota_requests=1, embed_timeout_s=5.0)
    async with serving(trusted) as http, running(trusted, HashEmbedder(trusted)):
        with anyio.fail_after(10):
            answers = await asyncio.gather(*(
                http.post("/v1/embeddings", json={"input": f"q{i}"}) for i in range(4)))
    assert [a.status_code for a in answers] == [200] * 4
    assert [k async for k in pipeline.redis.scan_iter(match="es:inflight:*")] == []


@pytest.mark.parametrize("step", ["indexed", "enqueued", "activated", "announced"])
async def test_a_caller_that_leaves_mid_submission_leaves_no_job_running(
    quick_settings: Settings, pipeline: Pipeline, step: str
) -> None:
    """The caller leaves while its job is being written (here: paused at `step`);
    the submission still ends, and the job it made is cancelled, not left to run."""
    reached, never = asyncio.Event(), asyncio.Event()

    async def pause(name: str) -> None:
        if name == step:
            reached.set()
            await never.wait()
    pipeline.scripts.step = pause
    texts = [f"text {i}" for i in range(quick_settings.fast_lane_max_texts + 1)]
    call = asyncio.ensure_future(pipeline.embed([Item(t) for t in texts],
                                                parse_options({})))
    with anyio.fail_after(5):
        await reached.wait()
    call.cancel()
    pipeline.scripts.step = no_step
    never.set()
    with contextlib.suppress(asyncio.CancelledError):
        await call
    made = [m.decode() for m in await pipeline.redis.zrange(KEYS.job_index(None), 0, -1)]
    assert [(await pipeline.job(job_id)).status for job_id in made] in ([], ["cancelled"])
