"""Workers sharing a queue, dying, coming back and meeting bad inputs.

In-process workers with fake embedders against a real server. A worker that
"dies" is either a consumer that claims entries with XREADGROUP and is never
heard of again, or a worker task cancelled in the middle of a batch whose
goodbye is suppressed, so its heartbeat expires as after a SIGKILL. Timings
are shortened through Settings (a 1 s visibility timeout); nothing sleeps to
wait: tests follow the job's events or poll with a deadline.
"""

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
import pytest

from pipeline.keys import GROUP
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import (
    GateEmbedder,
    HashEmbedder,
    NanEmbedder,
    PoisonEmbedder,
    SlowEmbedder,
    expected_vector,
)
from tests.support.timings import quick
from tests.support.workers import (
    BULK,
    DIMS,
    FAST,
    KEYS,
    LAYOUT,
    all_rows,
    assert_every_index_once,
    create_groups,
    feed_events,
    pending_count,
    poll,
    running,
    submit,
    texts_of,
    wait_end,
    wait_entered,
)
from workers.upkeep import Upkeep

pytestmark = pytest.mark.anyio

@pytest.fixture
def any_settings(any_redis_url: str, tmp_path: Any) -> Settings:
    # One bulk stream, on the cluster too: these tests read the lanes by name.
    return quick(Settings(redis_url=any_redis_url, data_dir=tmp_path / "data",
                          queue_partitions=1))


@pytest.fixture
async def pipeline(request: pytest.FixtureRequest) -> AsyncIterator[Pipeline]:
    name = "any_settings" if "any_settings" in request.fixturenames else "fast_settings"
    service = Pipeline(request.getfixturevalue(name))
    try:
        yield service
    finally:
        await service.close()



# Sharing the work


async def test_several_workers_produce_every_index_exactly_once(
    any_settings: Settings, pipeline: Pipeline
) -> None:
    texts = texts_of(1, 150)
    embedders = [HashEmbedder(any_settings) for _ in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        for embedder in embedders:
            await stack.enter_async_context(running(any_settings, embedder))
        job_id = await submit(pipeline, texts)
        await wait_end(pipeline, job_id)
    await assert_every_index_once(pipeline, job_id, texts)
    embedded = Counter(text for e in embedders for text in e.embedded_texts)
    assert embedded == Counter(texts)


async def test_jobs_queued_before_any_worker_existed_are_still_worked(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    first = await submit(pipeline, texts_of(1, 3))
    second = await submit(pipeline, texts_of(2, 10))
    async with running(fast_settings, HashEmbedder(fast_settings)):
        assert (await wait_end(pipeline, first))["status"] == "completed"
        assert (await wait_end(pipeline, second))["status"] == "completed"
    await assert_every_index_once(pipeline, first, texts_of(1, 3))
    await assert_every_index_once(pipeline, second, texts_of(2, 10))


async def test_the_fast_lane_is_read_before_the_bulk_lane(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    bulk = await submit(pipeline, texts_of(1, 40))
    small = await submit(pipeline, texts_of(2, 2))
    embedder = HashEmbedder(fast_settings)
    async with running(fast_settings, embedder):
        await wait_end(pipeline, bulk)
        await wait_end(pipeline, small)
    # The small job, queued last, rides in the first batch; bulk chunks fill the room left.
    assert embedder.calls[0][:2] == texts_of(2, 2)
    assert len(embedder.calls[0]) <= fast_settings.batch_max_texts


async def test_a_batch_never_holds_more_than_batch_max_texts(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    job_ids = [await submit(pipeline, texts_of(job, 4)) for job in range(6)]
    embedder = HashEmbedder(fast_settings)
    async with running(fast_settings, embedder):
        for job_id in job_ids:
            await wait_end(pipeline, job_id)
    assert max(len(call) for call in embedder.calls) <= fast_settings.batch_max_texts


# Dying and coming back


async def test_entries_of_a_consumer_that_vanished_are_reclaimed_and_finished(
    any_settings: Settings, pipeline: Pipeline
) -> None:
    client = pipeline.redis
    await create_groups(client)
    texts = texts_of(1, 20)
    job_id = await submit(pipeline, texts)
    claimed = await client.xreadgroup(GROUP, "ghost", {BULK: ">"}, count=3)
    assert len(claimed[0][1]) == 3
    embedder = HashEmbedder(any_settings)
    async with running(any_settings, embedder):
        await wait_end(pipeline, job_id)
    await assert_every_index_once(pipeline, job_id, texts)
    assert Counter(embedder.embedded_texts) == Counter(texts)
    assert await pending_count(client, BULK) == 0


async def test_a_worker_killed_mid_batch_is_recovered_by_another(
    fast_settings: Settings, pipeline: Pipeline, janitor_often: None
) -> None:
    texts = texts_of(1, 24)
    doomed_embedder = GateEmbedder(fast_settings)
    survivor_embedder = HashEmbedder(fast_settings)
    try:
        async with running(fast_settings, doomed_embedder) as doomed:
            job_id = await submit(pipeline, texts)
            await wait_entered(doomed_embedder)
            await doomed.kill()
        in_hand = doomed_embedder.calls[0]
        assert await pending_count(pipeline.redis, BULK) > 0
        async with running(fast_settings, survivor_embedder):
            await wait_end(pipeline, job_id)
    finally:
        doomed_embedder.open()
    await assert_every_index_once(pipeline, job_id, texts)
    # The survivor redid the batch the dead worker held, and everything else, once each.
    assert in_hand and Counter(survivor_embedder.embedded_texts) == Counter(texts)


async def test_a_dead_worker_is_announced_once_by_its_survivors(
    fast_settings: Settings, pipeline: Pipeline, janitor_often: None
) -> None:
    doomed_embedder = GateEmbedder(fast_settings)
    try:
        async with running(fast_settings, doomed_embedder) as doomed:
            job_id = await submit(pipeline, texts_of(1, 8))
            await wait_entered(doomed_embedder)
            await doomed.kill()
        dead_id = doomed.worker.worker_id
        assert dead_id in [w.decode() for w in await pipeline.redis.hkeys(KEYS.workers)]

        async def announced() -> list[Any]:
            return [d for t, d in await feed_events(pipeline.redis)
                    if t == "worker.down" and d["id"] == dead_id]

        async with running(fast_settings, HashEmbedder(fast_settings)), \
                running(fast_settings, HashEmbedder(fast_settings)):
            downs = await poll(announced)
            await wait_end(pipeline, job_id)
            # Let each survivor's janitor pass at least once more before counting.
            await poll(lambda: _janitor_passes(pipeline, dead_id))
    finally:
        doomed_embedder.open()
    assert downs == [{"id": dead_id, "reason": "heartbeat expired"}]
    assert len(await announced()) == 1
    assert dead_id not in [w.decode() for w in await pipeline.redis.hkeys(KEYS.workers)]


async def _janitor_passes(pipeline: Pipeline, dead_id: str) -> bool:
    """True once the dead worker's consumer is gone from both lanes (a janitor removed it)."""
    for stream in (FAST, BULK):
        consumers = await pipeline.redis.xinfo_consumers(stream, GROUP)
        if any(c["name"] in (dead_id, dead_id.encode()) for c in consumers):
            return False
    return True


async def test_a_restarted_worker_resumes_its_own_pending_entries_at_once(
    settings: Settings, pipeline: Pipeline
) -> None:
    slow_reclaim = quick(settings).replace(visibility_timeout_s=60.0)
    await create_groups(pipeline.redis)
    texts = texts_of(1, 12)
    job_id = await submit(pipeline, texts)
    await pipeline.redis.xreadgroup(GROUP, "worker-7", {BULK: ">"}, count=10)
    async with running(slow_reclaim, HashEmbedder(slow_reclaim), worker_id="worker-7"):
        await wait_end(pipeline, job_id, timeout_s=5)
    await assert_every_index_once(pipeline, job_id, texts)


async def test_lease_renewal_keeps_a_slow_batch_from_being_reclaimed(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    texts = texts_of(1, fast_settings.chunk_size)  # one chunk, all in the slow batch
    slow = SlowEmbedder(fast_settings, delay_s=3 * fast_settings.visibility_timeout_s)
    rival = HashEmbedder(fast_settings)
    async with running(fast_settings, slow):
        job_id = await submit(pipeline, texts)
        await poll(lambda: _has_calls(slow))
        async with running(fast_settings, rival):
            await wait_end(pipeline, job_id)
    await assert_every_index_once(pipeline, job_id, texts)
    assert Counter(slow.embedded_texts) == Counter(texts)
    assert rival.calls == []


async def _has_calls(embedder: HashEmbedder) -> bool:
    return bool(embedder.calls)


async def test_a_chunk_delivered_too_often_is_given_up_as_failed(
    any_settings: Settings, pipeline: Pipeline
) -> None:
    client = pipeline.redis
    await create_groups(client)
    texts = texts_of(1, 12)
    job_id = await submit(pipeline, texts)
    [(_, [(poisoned, _)])] = await client.xreadgroup(GROUP, "ghost", {BULK: ">"}, count=1)
    # As if it had already been delivered max_deliveries times, and idle for a minute.
    await client.xclaim(BULK, GROUP, "ghost", 0, [poisoned], idle=60_000,
                        retrycount=any_settings.max_deliveries)
    embedder = HashEmbedder(any_settings)
    async with running(any_settings, embedder):
        end = await wait_end(pipeline, job_id)
    assert (end["status"], end["done"], end["failed"]) == ("completed", 8, 4)
    rows = await all_rows(pipeline, job_id)
    assert [row["index"] for row in rows] == list(range(12))
    for row in rows[:4]:
        assert row["embedding"] is None
        assert f"gave up after {any_settings.max_deliveries} deliveries" in row["error"]
    assert all(row["embedding"] is not None for row in rows[4:])
    assert not set(texts[:4]) & set(embedder.embedded_texts)
    assert await pending_count(client, BULK) == 0


async def test_a_job_whose_only_chunk_is_given_up_ends_failed(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    client = pipeline.redis
    await create_groups(client)
    job_id = await submit(pipeline, texts_of(1, 3))
    [(_, [(poisoned, _)])] = await client.xreadgroup(GROUP, "ghost", {FAST: ">"}, count=1)
    await client.xclaim(FAST, GROUP, "ghost", 0, [poisoned], idle=60_000,
                        retrycount=fast_settings.max_deliveries)
    async with running(fast_settings, HashEmbedder(fast_settings)):
        end = await wait_end(pipeline, job_id)
    assert (end["status"], end["done"], end["failed"]) == ("failed", 0, 3)
    assert "every input failed" in end["error"]


# Bad inputs


async def test_a_poison_text_fails_alone(fast_settings: Settings, pipeline: Pipeline) -> None:
    mixed = ["fine one", "fine two", "this is POISON", "fine three", "fine four", "fine five"]
    other = texts_of(2, 3)
    mixed_id = await submit(pipeline, mixed)
    other_id = await submit(pipeline, other)
    embedder = PoisonEmbedder(fast_settings)
    async with running(fast_settings, embedder):
        end = await wait_end(pipeline, mixed_id)
        await wait_end(pipeline, other_id)
    assert (end["status"], end["done"], end["failed"]) == ("completed", 5, 1)
    rows = await all_rows(pipeline, mixed_id)
    for row, text in zip(rows, mixed, strict=True):
        if "POISON" in text:
            assert row["embedding"] is None
            assert "poisons the model" in row["error"]
        else:
            assert row["embedding"] == pytest.approx(expected_vector(text, DIMS), abs=1e-6)
    await assert_every_index_once(pipeline, other_id, other)


async def test_a_job_of_one_poison_text_fails_at_once_with_the_models_error(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    # With the visibility timeout at a minute, only a direct failure ends this in time.
    patient = fast_settings.replace(visibility_timeout_s=60.0)
    job_id = await submit(pipeline, ["POISON alone"])
    async with running(patient, PoisonEmbedder(patient)):
        end = await wait_end(pipeline, job_id, timeout_s=5)
    assert (end["status"], end["failed"]) == ("failed", 1)
    [row] = await all_rows(pipeline, job_id)
    assert row["embedding"] is None and "poisons the model" in row["error"]


async def test_a_non_finite_vector_fails_its_input(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    job_id = await submit(pipeline, ["good", "NAN here", "also good"])
    async with running(fast_settings, NanEmbedder(fast_settings)):
        end = await wait_end(pipeline, job_id)
    assert (end["done"], end["failed"]) == (2, 1)
    rows = await all_rows(pipeline, job_id)
    assert rows[1]["embedding"] is None and "non-finite" in rows[1]["error"]
    assert rows[0]["embedding"] == pytest.approx(expected_vector("good", DIMS), abs=1e-6)


# Cancelling


async def test_a_cancelled_jobs_queued_chunks_are_acked_without_embedding(
    any_settings: Settings, pipeline: Pipeline
) -> None:
    cancelled = await submit(pipeline, texts_of(1, 20))
    await pipeline.cancel(cancelled)
    kept = await submit(pipeline, texts_of(2, 6))
    embedder = HashEmbedder(any_settings)
    async with running(any_settings, embedder):
        await wait_end(pipeline, kept)
        await poll(lambda: _queue_drained(pipeline))
    assert not set(texts_of(1, 20)) & set(embedder.embedded_texts)
    job = await pipeline.job(cancelled)
    assert (job.status, job.done) == ("cancelled", 0)


async def _queue_drained(pipeline: Pipeline) -> bool:
    for stream in (FAST, BULK):
        [group] = await pipeline.redis.xinfo_groups(stream)
        if int(group["pending"]) or int(group["lag"] or 0):
            return False
    return True


async def test_a_job_cancelled_mid_batch_keeps_no_late_results(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    texts = texts_of(1, 40)
    embedder = GateEmbedder(fast_settings)
    try:
        async with running(fast_settings, embedder):
            job_id = await submit(pipeline, texts)
            await wait_entered(embedder)
            await pipeline.cancel(job_id)
            embedder.open()
            end = await wait_end(pipeline, job_id)
            await poll(lambda: _queue_drained(pipeline))
    finally:
        embedder.open()
    assert end["status"] == "cancelled"
    assert len(embedder.calls) == 1  # the batch in hand; no chunk after the cancel
    assert await all_rows(pipeline, job_id) == []
    assert (await pipeline.job(job_id)).done == 0


# Trimming


async def test_trimming_drops_acked_entries_but_never_pending_or_undelivered_ones(
    any_settings: Settings, pipeline: Pipeline
) -> None:
    client = pipeline.redis
    await create_groups(client)
    await submit(pipeline, texts_of(1, 24))  # six chunks in the bulk lane
    ids = [entry_id for entry_id, _ in await client.xrange(BULK)]
    assert len(ids) == 6

    async def read(consumer: str, count: int) -> list[bytes]:
        reply = await client.xreadgroup(GROUP, consumer, {BULK: ">"}, count=count)
        return [entry_id for entry_id, _ in reply[0][1]]

    await client.xack(BULK, GROUP, *await read("c1", 2))
    stuck = await read("ghost", 1)
    await client.xack(BULK, GROUP, *await read("c1", 2))  # the sixth stays undelivered
    upkeep = Upkeep(client, KEYS, any_settings, "janitor", HashEmbedder(any_settings).info,
                    LAYOUT)

    await upkeep.trim_queues()
    assert [e for e, _ in await client.xrange(BULK)] == ids[2:]
    reclaimed = await client.xautoclaim(BULK, GROUP, "c2", 0, count=10)
    assert [entry_id for entry_id, fields in reclaimed[1] if fields] == stuck

    await client.xack(BULK, GROUP, *stuck)
    await upkeep.trim_queues()
    assert [e for e, _ in await client.xrange(BULK)] == ids[4:]
    assert await read("c2", 10) == ids[5:]


async def test_a_working_worker_trims_the_queue_it_drained(
    fast_settings: Settings, pipeline: Pipeline, janitor_often: None
) -> None:
    job_id = await submit(pipeline, texts_of(1, 40))
    assert await pipeline.redis.xlen(BULK) == 10
    async with running(fast_settings, HashEmbedder(fast_settings)):
        await wait_end(pipeline, job_id)
        await poll(lambda: _trimmed(pipeline))


async def _trimmed(pipeline: Pipeline) -> bool:
    return int(await pipeline.redis.xlen(BULK)) <= 1


# Lifecycle in the feed


async def test_a_clean_stop_says_goodbye_and_removes_the_heartbeat(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    client = pipeline.redis
    async with running(fast_settings, HashEmbedder(fast_settings)) as run:
        worker_id = run.worker.worker_id
        assert await client.exists(KEYS.heartbeat(worker_id))
        assert await client.hexists(KEYS.workers, worker_id)
        registered = await client.hget(KEYS.models, DEFAULT_MODEL)
        assert orjson.loads(registered) == {"name": DEFAULT_MODEL, "dimensions": DIMS,
                                            "max_seq_length": 256,
                                            "prompts": {"query": "", "document": ""},
                                            "default_prompt_name": None,
                                            "backend": fast_settings.backend,
                                            "backend_reason": ""}
    assert not await client.exists(KEYS.heartbeat(worker_id))
    assert not await client.hexists(KEYS.workers, worker_id)
    events = [(t, d) for t, d in await feed_events(client) if d.get("id") == worker_id]
    assert [t for t, _ in events] == ["worker.up", "worker.down"]
    assert events[0][1]["model"] == DEFAULT_MODEL
    assert events[1][1]["reason"] == "stopped"


async def test_two_survivors_sweeping_at_once_announce_a_dead_worker_once(
    any_settings: Settings, pipeline: Pipeline
) -> None:
    client = pipeline.redis
    info = HashEmbedder(any_settings).info
    upkeeps = [Upkeep(client, KEYS, any_settings, name, info, LAYOUT)
               for name in ("dead", "alive-1", "alive-2")]
    for upkeep in upkeeps:
        await upkeep.register()
    await client.delete(KEYS.heartbeat("dead"))  # its TTL ran out
    async with anyio.create_task_group() as tg:
        for upkeep in upkeeps[1:] * 3:
            tg.start_soon(upkeep.sweep_dead_workers)
    downs = [d for t, d in await feed_events(client) if t == "worker.down"]
    assert downs == [{"id": "dead", "reason": "heartbeat expired"}]
    assert sorted(w.decode() for w in await client.hkeys(KEYS.workers)) == ["alive-1",
                                                                             "alive-2"]


# Redis losing its data or restarting under a running worker


async def test_a_worker_recovers_when_redis_loses_its_data(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    embedder = HashEmbedder(fast_settings)
    async with running(fast_settings, embedder):
        await pipeline.redis.flushall()  # groups, worker entries, models: all gone
        with anyio.fail_after(10):
            while not (await pipeline.ready()).workers:
                await asyncio.sleep(0.05)
        texts = texts_of(7, 10)
        job_id = await submit(pipeline, texts)
        end = await wait_end(pipeline, job_id)
    assert end["status"] == "completed" and end["done"] == 10


async def test_a_worker_carries_on_after_redis_restarts(tmp_path: Any) -> None:
    from pipeline.store.embedded import EmbeddedRedis

    data = tmp_path / "redis"
    with EmbeddedRedis(data, binary="valkey") as server:
        settings = quick(Settings(redis_url=server.url, data_dir=tmp_path))
        pipeline = Pipeline(settings)
        try:
            async with running(settings, HashEmbedder(settings)):
                first = await submit(pipeline, texts_of(8, 6))
                await wait_end(pipeline, first)
                server.stop()
                with EmbeddedRedis(data, binary="valkey"):  # the same socket again
                    second = await submit(pipeline, texts_of(9, 6))
                    end = await wait_end(pipeline, second)
                    assert end["status"] == "completed" and end["done"] == 6
                    assert (await pipeline.job(first)).status == "completed"
        finally:
            await pipeline.close()
