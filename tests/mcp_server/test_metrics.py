"""GET /metrics: parses as Prometheus text, and its counters move as a job runs.

The app runs in-process with an in-process worker (fake embedder). The
worker-side figures (batch sizes, durations) go through Redis, so what this
test reads is what any server replica would report.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mcp_server.app import create_app
from pipeline.keys import Keys
from pipeline.settings import Settings
from pipeline.store import metrics
from pipeline.store.connections import connect
from tests.support.fakes import HashEmbedder
from workers.worker import run_worker

pytestmark = pytest.mark.anyio


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, with_mcp=False)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_worker(settings, HashEmbedder(settings), stop, ready))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport,
                                         base_url="http://127.0.0.1") as client:
                yield client
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[Any, ...]], float]:
    """Every sample of /metrics, parsed by prometheus_client's own parser."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    samples: dict[tuple[str, tuple[Any, ...]], float] = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name.startswith("embedstream_"), family.name
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[Any, ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counters_move_as_a_job_runs(settings: Settings) -> None:
    fast = settings.replace(block_ms=100, chunk_size=4, fast_lane_max_texts=4,
                            batch_max_texts=8, heartbeat_interval_s=0.2)
    async with serving(fast) as client:
        before = await scrape(client)
        reply = await client.post("/v1/jobs", json={"inputs": [f"text {i}" for i in range(20)]})
        assert reply.status_code == 202
        job_id = reply.json()["id"]
        with anyio.fail_after(10):
            while (await client.get(f"/v1/jobs/{job_id}")).json()["status"] != "completed":
                await anyio.sleep(0.05)
        after = await scrape(client)
    assert value(after, "embedstream_texts_embedded_total") - value(
        before, "embedstream_texts_embedded_total") == 20
    assert value(after, "embedstream_batch_texts_sum") - value(
        before, "embedstream_batch_texts_sum") == 20
    assert value(after, "embedstream_batch_texts_count") >= 3  # 20 texts, at most 8 a call
    assert value(after, "embedstream_batch_texts_bucket", le="8.0") == value(
        after, "embedstream_batch_texts_count")
    assert value(after, "embedstream_embed_seconds_count") == value(
        after, "embedstream_batch_texts_count")
    assert value(after, "embedstream_batch_tokens_sum") == 20 * 4  # "text N": 2 words + 2
    assert value(after, "embedstream_workers") == 1
    route = {"route": "/v1/jobs", "method": "POST", "status": "202"}
    assert value(after, "embedstream_http_requests_total", **route) == 1
    lane = {"model": "all-MiniLM-L6-v2", "lane": "bulk"}
    assert ("embedstream_queue_waiting_chunks", tuple(sorted(lane.items()))) in after
    assert value(after, "embedstream_queue_lag_seconds", **lane) == 0


async def test_given_up_inputs_are_counted_from_redis(settings: Settings) -> None:
    assert settings.redis_url
    redis = connect(settings.redis_url)
    try:
        await metrics.record_given_up(redis, Keys("es"), 3)
    finally:
        await redis.aclose()
    async with serving(settings) as client:
        samples = await scrape(client)
    assert value(samples, "embedstream_inputs_given_up_total") == 3


async def test_an_open_event_stream_counts_as_a_subscriber(settings: Settings) -> None:
    async with serving(settings) as client:
        assert value(await scrape(client), "embedstream_sse_subscribers", stream="feed") == 0
        listener = asyncio.create_task(client.get("/v1/events"))
        with anyio.fail_after(10):
            while value(await scrape(client), "embedstream_sse_subscribers", stream="feed") < 1:
                await anyio.sleep(0.05)
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
        assert value(await scrape(client), "embedstream_sse_subscribers", stream="feed") == 0
