"""Inputs that kill the worker's process: a redelivered chunk is embedded text by text.

The death itself is simulated here (a ghost consumer's entry, idle, with the
attempt record a dying worker leaves); tests/e2e/test_worker_signals.py has
the real segfaulting process.
"""


import orjson
import pytest

from pipeline.keys import GROUP
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder, expected_vector
from tests.support.workers import (
    BULK,
    DIMS,
    KEYS,
    all_rows,
    create_groups,
    running,
    submit,
    texts_of,
    wait_end,
)
from workers.batch import DIED_ON_IT

pytestmark = pytest.mark.anyio


async def die_holding(pipeline: Pipeline, job_id: str, record: dict[str, object] | None,
                      deliveries: int) -> None:
    """As if a worker read chunk 0, died `deliveries` times on it, the last leaving `record`."""
    client = pipeline.redis
    await create_groups(client)
    [(_, [(entry_id, _)])] = await client.xreadgroup(GROUP, "ghost", {BULK: ">"}, count=1)
    await client.xclaim(BULK, GROUP, "ghost", 0, [entry_id], idle=60_000,
                        retrycount=deliveries)
    if record is not None:
        await client.set(KEYS.attempt(job_id, 0), orjson.dumps(record), ex=600)


async def test_the_input_a_worker_died_on_fails_alone_on_the_next_delivery(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    texts = texts_of(1, 8)
    job_id = await submit(pipeline, texts)
    await die_holding(pipeline, job_id, {"trying": 2, "given_up": []}, deliveries=1)
    embedder = HashEmbedder(fast_settings)
    async with running(fast_settings, embedder):
        end = await wait_end(pipeline, job_id)
    assert (end["status"], end["done"], end["failed"]) == ("completed", 7, 1)
    rows = await all_rows(pipeline, job_id)
    assert rows[2]["embedding"] is None and rows[2]["error"] == DIED_ON_IT
    for row in rows[:2] + rows[3:]:
        assert row["embedding"] == pytest.approx(expected_vector(texts[row["index"]], DIMS),
                                                 abs=1e-6)
    # Chunk 0 came again, so it went alone, text by text; chunk 1 in one call.
    assert [c for c in embedder.calls if len(c) == 1] == [[t] for t in texts[:4] if t != texts[2]]
    record = orjson.loads(await pipeline.redis.get(KEYS.attempt(job_id, 0)))
    assert (record["trying"], record["given_up"], bool(record["worker"])) == (None, [2], True)
    assert await pipeline.redis.ttl(KEYS.attempt(job_id, 0)) > 0


async def test_a_worker_that_lost_redis_mid_chunk_blames_no_input(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    """The record names a worker whose heartbeat lives: it did not die, it lost Redis
    between two writes (a failover), so the text it had in hand is tried again."""
    texts = texts_of(3, 8)
    job_id = await submit(pipeline, texts)
    await pipeline.redis.set(KEYS.heartbeat("alive-worker"), b"1", px=60_000)
    await die_holding(pipeline, job_id, {"trying": 2, "given_up": [], "worker": "alive-worker"},
                      deliveries=1)
    async with running(fast_settings, HashEmbedder(fast_settings)):
        end = await wait_end(pipeline, job_id)
    assert (end["status"], end["done"], end["failed"]) == ("completed", 8, 0)


async def test_a_chunk_past_the_delivery_limit_goes_on_while_each_death_names_an_input(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    texts = texts_of(2, 8)
    job_id = await submit(pipeline, texts)
    past_limit = fast_settings.max_deliveries + 2
    await die_holding(pipeline, job_id, {"trying": 3, "given_up": [1]}, deliveries=past_limit)
    async with running(fast_settings, HashEmbedder(fast_settings)):
        end = await wait_end(pipeline, job_id)
    assert (end["done"], end["failed"]) == (6, 2)
    rows = await all_rows(pipeline, job_id)
    assert [row["index"] for row in rows if row["embedding"] is None] == [1, 3]
    assert {row["error"] for row in rows if row["embedding"] is None} == {DIED_ON_IT}


async def test_a_chunk_past_the_limit_with_no_input_in_hand_is_given_up(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    # Its last delivery finished every text and died later (in the commit, say):
    # no input is to blame, and the limit holds.
    job_id = await submit(pipeline, texts_of(3, 8))
    past_limit = fast_settings.max_deliveries + 1
    await die_holding(pipeline, job_id, {"trying": None, "given_up": []}, deliveries=past_limit)
    async with running(fast_settings, HashEmbedder(fast_settings)):
        end = await wait_end(pipeline, job_id)
    assert (end["done"], end["failed"]) == (4, 4)
    rows = await all_rows(pipeline, job_id)
    assert all("gave up after" in row["error"] for row in rows[:4])
