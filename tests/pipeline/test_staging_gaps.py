"""An upload that pauses keeps every input, a job never becomes visible with inputs missing,
and a worker that meets a missing chunk of a visible job fails it visibly."""

from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from pipeline.errors import JobNotFound, Unavailable
from pipeline.inputs import Item, JobOptions
from pipeline.keys import Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder
from tests.support.timings import quick
from tests.support.workers import all_rows, assert_every_index_once, running, texts_of, wait_end
from workers.batch import LOST_INPUT

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
TOTAL = 12


@pytest.fixture
def gap_settings(settings: Settings) -> Settings:
    return quick(settings).replace(staging_ttl_s=1, calibrate=False)


def items(texts: list[str]) -> list[Item]:
    return [Item(text, f"id-{i}") for i, text in enumerate(texts)]


async def upload(texts: list[str], at: int, then: Any) -> AsyncIterator[Item]:
    """The inputs, with `then()` awaited before input `at` (a pause, or a fault)."""
    for i, item in enumerate(items(texts)):
        if i == at:
            await then()
        yield item


async def queued_entries(pipeline: Pipeline) -> int:
    return sum([await pipeline.redis.xlen(q) for q in KEYS.queues(DEFAULT_MODEL)])


async def test_an_upload_that_pauses_longer_than_the_staging_time_keeps_every_input(
    gap_settings: Settings,
) -> None:
    texts = texts_of(1, TOTAL)
    pipeline = Pipeline(gap_settings)
    try:
        async def pause() -> None:
            # The producer is slow, not dead: 2.5 staging TTLs with nothing sent.
            await anyio.sleep(2.5 * gap_settings.staging_ttl_s)

        writer = await pipeline.writer(JobOptions())
        job = await pipeline.commit(writer, upload(texts, 6, pause))
        assert job.total == TOTAL
        assert await pipeline.redis.hlen(KEYS.inputs(job.id)) == job.chunks
        async with running(gap_settings, HashEmbedder(gap_settings)):
            assert (await wait_end(pipeline, job.id))["status"] == "completed"
        await assert_every_index_once(pipeline, job.id, texts)
    finally:
        await pipeline.close()


async def test_a_commit_whose_inputs_lost_a_chunk_is_refused_and_queues_nothing(
    gap_settings: Settings,
) -> None:
    pipeline = Pipeline(gap_settings)
    try:
        writer = await pipeline.writer(JobOptions())

        async def lose_chunk() -> None:  # as an expiry would, with chunks 0 and 1 written
            assert await pipeline.redis.hdel(KEYS.inputs(writer.job_id), "0") == 1

        with pytest.raises(Unavailable, match="expired before it was committed"):
            await pipeline.commit(writer, upload(texts_of(2, TOTAL), 9, lose_chunk))
        assert await queued_entries(pipeline) == 0
        assert not await pipeline.redis.exists(KEYS.job(writer.job_id),
                                               KEYS.inputs(writer.job_id))
        assert await pipeline.redis.zcard(KEYS.job_index(None)) == 0
    finally:
        await pipeline.close()


async def test_a_chunk_lost_after_staging_keeps_the_job_from_becoming_visible(
    gap_settings: Settings,
) -> None:
    pipeline = Pipeline(gap_settings)
    try:
        writer = await pipeline.writer(JobOptions())

        async def hook(step: str) -> None:
            if step == "enqueued":
                await pipeline.redis.hdel(KEYS.inputs(writer.job_id), "1")
        pipeline.scripts.step = hook
        with pytest.raises(Unavailable, match="nothing was queued: retry the upload"):
            await pipeline.commit(writer, items(texts_of(3, TOTAL)))
        with pytest.raises(JobNotFound):
            await pipeline.job(writer.job_id)
        assert not await pipeline.redis.exists(KEYS.job(writer.job_id),
                                               KEYS.inputs(writer.job_id))
    finally:
        await pipeline.close()


@pytest.mark.parametrize(("lost", "status", "failed"), [
    (["1"], "completed", [4, 5, 6, 7]),  # a partial job: the other chunks are embedded
    (["0", "1", "2"], "failed", list(range(10))),
])
async def test_a_worker_fails_the_inputs_of_a_missing_chunk_and_the_job_ends(
    gap_settings: Settings, lost: list[str], status: str, failed: list[int]
) -> None:
    pipeline = Pipeline(gap_settings)
    try:
        job = await pipeline.submit(items(texts_of(4, 10)), JobOptions())
        await pipeline.redis.hdel(KEYS.inputs(job.id), *lost)
        async with running(gap_settings, HashEmbedder(gap_settings)):
            end = await wait_end(pipeline, job.id)
        assert end["status"] == status
        record = await pipeline.job(job.id)
        assert (record.done, record.failed) == (10 - len(failed), len(failed))
        rows = await all_rows(pipeline, job.id)
        assert [row["index"] for row in rows] == list(range(10))
        assert [row["index"] for row in rows if row.get("error") == LOST_INPUT] == failed
        assert all(row["embedding"] is not None for row in rows if row["index"] not in failed)
    finally:
        await pipeline.close()
