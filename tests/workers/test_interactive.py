"""Interactive requests: a few texts embedded through the fast lane without a job."""

import asyncio

import anyio
import pytest

from pipeline.inputs import Item, JobOptions
from pipeline.keys import GROUP, Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.store.metrics import read_metrics
from tests.support.fakes import HashEmbedder, PoisonEmbedder, expected_vector, token_count
from tests.support.workers import create_groups, feed_events, running

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
FAST = KEYS.queue(DEFAULT_MODEL, "fast")
DIMS = 384


async def test_a_few_texts_are_embedded_without_a_job_or_feed_events(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    texts = ["first query", "second query"]
    async with running(fast_settings, HashEmbedder(fast_settings)):
        before = await feed_events(pipeline.redis)
        job = await pipeline.embed([Item(t) for t in texts], JobOptions(dimensions=32))
        rows = job.rows
        after = await feed_events(pipeline.redis)
    assert [row["index"] for row in rows] == [0, 1]
    for row, text in zip(rows, texts, strict=True):
        assert row["embedding"] == pytest.approx(
            expected_vector(text, DIMS, output_dimensions=32), abs=1e-6)
    assert (job.status, job.done, job.dimensions) == ("completed", 2, 32)
    assert job.tokens == sum(token_count(t) for t in texts)
    assert [k async for k in pipeline.redis.scan_iter(match="es:{*}:job")] == []
    assert after == before
    assert int(await pipeline.redis.get(KEYS.texts_counter)) == 2
    counters, _ = await read_metrics(pipeline.redis, KEYS)
    assert counters["interactive_requests"] == 1
    assert await pipeline.redis.xpending(FAST, GROUP) == {
        "pending": 0, "min": None, "max": None, "consumers": []}


async def test_a_request_held_by_a_dead_worker_is_answered_by_a_peer(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    await create_groups(pipeline.redis)
    asked = asyncio.create_task(pipeline.embed([Item("orphaned query")], JobOptions()))
    with anyio.fail_after(10):
        while not await pipeline.redis.xlen(FAST):
            await anyio.sleep(0.01)
    # A consumer claims the request and is never heard of again.
    claimed = await pipeline.redis.xreadgroup(GROUP, "ghost", {FAST: ">"}, count=1)
    assert claimed
    async with running(fast_settings, HashEmbedder(fast_settings)):
        with anyio.fail_after(15):
            job = await asked
            rows = job.rows
    assert rows[0]["embedding"] == pytest.approx(expected_vector("orphaned query", DIMS),
                                                 abs=1e-6)
    assert job.status == "completed"


async def test_a_poison_text_in_a_request_fails_alone(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    async with running(fast_settings, PoisonEmbedder(fast_settings)):
        job = await pipeline.embed([Item("fine"), Item("POISON here")], JobOptions())
        rows = job.rows
    assert rows[0]["embedding"] is not None
    assert rows[1]["embedding"] is None
    assert "poisons the model" in rows[1]["error"]
    assert (job.done, job.failed) == (1, 1)


async def test_more_texts_than_the_fast_lane_takes_still_make_a_job(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    texts = [f"text {i}" for i in range(fast_settings.fast_lane_max_texts + 1)]
    async with running(fast_settings, HashEmbedder(fast_settings)):
        job = await pipeline.embed([Item(t) for t in texts], JobOptions())
        rows = job.rows
    assert len(rows) == len(texts)
    assert await pipeline.redis.exists(KEYS.job(job.id))
    assert job.tokens == sum(token_count(t) for t in texts)
