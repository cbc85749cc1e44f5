"""A submitter or canceller that dies between any two steps loses nothing and strands nothing.

The dying process is a Pipeline whose step hook, at the chosen step, cuts
its Redis connections (every later command fails, cleanup included, as
after a kill -9) and raises. A retry with the same Idempotency-Key through
a fresh Pipeline must then give a job that an in-process worker completes
with every index exactly once, one `job.created` and one `job.completed` on
the feed (the janitor announces what the dead process did not), and no key
left without a TTL, as the real server reports them.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
import pytest

from pipeline.errors import Conflict
from pipeline.inputs import Item, JobOptions
from pipeline.jobs import janitor
from pipeline.jobs.record import JobRecord, JobStatus
from pipeline.keys import Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.store.connections import connect
from tests.support.fakes import HashEmbedder
from tests.support.faults import Died, die, dying_at
from workers import batch, commits
from workers.worker import Worker

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
TOTAL = 10
KEY = "retry-me"
# Keys shared by every job, which live as long as the deployment (no TTL by design).
LONG_LIVED = {KEYS.feed, KEYS.workers, KEYS.models, KEYS.metrics, KEYS.texts_counter,
              KEYS.active_jobs, *KEYS.queues(DEFAULT_MODEL), KEYS.calibration(DEFAULT_MODEL),
              KEYS.job_index(None), KEYS.job_index("")}
SUBMISSION_STEPS = ["listed", "upload", "staged", "indexed", "enqueued:0", "enqueued",
                    "activated", "bound", "announced"]


@pytest.fixture
def fault_settings(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    # Entries of a job still staged are waited on briefly; keep that short here.
    monkeypatch.setattr(batch, "STAGED_WAIT_S", 0.1)
    return settings.replace(block_ms=50, chunk_size=4, fast_lane_max_texts=4,
                            heartbeat_interval_s=0.2, heartbeat_ttl_s=2.0,
                            visibility_timeout_s=1.0, staging_ttl_s=3,
                            idempotency_lease_s=0.3, calibrate=False)


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    async with Worker.start(settings, HashEmbedder(settings)) as worker:
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(worker.run(stop, ready))
        with anyio.fail_after(10):
            await ready.wait()
        try:
            yield worker
        finally:
            stop.set()
            with anyio.fail_after(10):
                await task


def texts() -> list[Item]:
    return [Item(f"text number {i}", f"id-{i}") for i in range(TOTAL)]


async def retry(settings: Settings) -> JobRecord:
    """Submit again with the same key until the dead upload's lease has lapsed."""
    pipeline = Pipeline(settings)
    try:
        with anyio.fail_after(10):
            while True:
                try:
                    return await pipeline.submit(texts(), JobOptions(), idempotency_key=KEY)
                except Conflict:
                    await anyio.sleep(0.05)
    finally:
        await pipeline.close()


async def wait_finished(pipeline: Pipeline, job_id: str) -> JobRecord:
    with anyio.fail_after(20):
        while True:
            job = await pipeline.job(job_id)
            if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
                return job
            await anyio.sleep(0.05)


async def all_indexes(pipeline: Pipeline, job_id: str) -> list[int]:
    indexes: list[int] = []
    cursor = None
    while True:
        page = await pipeline.results(job_id, cursor, limit=1000)
        indexes += [row["index"] for row in page.rows]
        cursor = page.next_cursor
        if cursor is None:
            return indexes


async def feed_events(redis: Any, job_id: str) -> list[str]:
    return [fields[b"type"].decode() for _, fields in await redis.xrange(KEYS.feed)
            if orjson.loads(fields[b"data"]).get("id") == job_id]


async def keys_without_ttl(redis: Any) -> list[bytes]:
    found = []
    async for key in redis.scan_iter(count=1000):
        if key.decode() not in LONG_LIVED and await redis.ttl(key) == -1:
            found.append(key)
    return found


async def settle(pipeline: Pipeline, settings: Settings) -> None:
    """What the janitor of any live process does within a sweep or two."""
    for _ in range(2):
        await janitor.sweep_jobs(pipeline.scripts, settings)


async def submit_dying(settings: Settings, step: str) -> None:
    dying = Pipeline(settings)
    try:
        dying_at(dying, step)

        async def upload() -> AsyncIterator[Item]:
            for i, item in enumerate(texts()):
                if step == "upload" and i == TOTAL - 2:
                    die(dying)  # mid-upload: some chunks written, the rest never comes
                yield item

        with pytest.raises(Died):
            writer = await dying.writer(JobOptions())
            await dying.commit(writer, upload(), KEY)
    finally:
        await dying.close()


@pytest.mark.parametrize("step", SUBMISSION_STEPS)
async def test_a_submitter_killed_at_any_step_leaves_a_retry_that_completes_exactly_once(
    fault_settings: Settings, step: str
) -> None:
    await submit_dying(fault_settings, step)
    check = Pipeline(fault_settings)
    try:
        assert await keys_without_ttl(check.redis) == []
        async with running_worker(fault_settings):
            job = await retry(fault_settings)
            end = await wait_finished(check, job.id)
            assert (end.status, end.done, end.failed) == ("completed", TOTAL, 0)
            assert sorted(await all_indexes(check, job.id)) == list(range(TOTAL))
            await settle(check, fault_settings)
        assert await feed_events(check.redis, job.id) == ["job.created", "job.completed"]
        assert await keys_without_ttl(check.redis) == []
        assert await check.redis.zcard(KEYS.active_jobs) <= 1  # the dead staged one, if any
    finally:
        await check.close()


async def test_a_retry_after_the_job_became_visible_gets_that_same_job(
    fault_settings: Settings,
) -> None:
    for step in ("activated", "bound"):
        await connect_and_flush(fault_settings)
        await submit_dying(fault_settings, step)
        first = await any_job_id(fault_settings)
        assert first is not None, step
        again = await retry(fault_settings)
        assert again.id == first, step


async def test_a_retry_before_the_job_became_visible_gets_a_new_job_and_nothing_is_left(
    fault_settings: Settings,
) -> None:
    await submit_dying(fault_settings, "enqueued")
    check = Pipeline(fault_settings)
    try:
        staged = await any_job_id(fault_settings, status=b"staged")
        assert staged is not None
        again = await retry(fault_settings)
        assert again.id != staged
        # The dead one's record and inputs expire with the staging TTL, unseen.
        assert 0 < await check.redis.ttl(KEYS.job(staged)) <= fault_settings.staging_ttl_s
        with pytest.raises(Exception, match="does not exist"):
            await check.job(staged)
    finally:
        await check.close()


async def connect_and_flush(settings: Settings) -> None:
    assert settings.redis_url
    redis = connect(settings.redis_url)
    try:
        await redis.flushall()
    finally:
        await redis.aclose()


async def any_job_id(settings: Settings, status: bytes | None = None) -> str | None:
    assert settings.redis_url
    redis = connect(settings.redis_url)
    try:
        async for key in redis.scan_iter(match="es:{*}:job", count=1000):
            if status is None or await redis.hget(key, "status") == status:
                return str(key.decode().split("{")[1].split("}")[0])
        return None
    finally:
        await redis.aclose()


async def test_a_canceller_killed_before_announcing_leaves_the_janitor_to_announce_once(
    fault_settings: Settings,
) -> None:
    submitter = Pipeline(fault_settings)
    dying = Pipeline(fault_settings)
    try:
        job = await submitter.submit(texts(), JobOptions())
        dying_at(dying, "cancelled")
        with pytest.raises(Died):
            await dying.cancel(job.id)
        assert (await submitter.job(job.id)).status == "cancelled"
        assert await feed_events(submitter.redis, job.id) == ["job.created"]
        await settle(submitter, fault_settings)
        await settle(submitter, fault_settings)
        assert await feed_events(submitter.redis, job.id) == ["job.created", "job.cancelled"]
        assert await submitter.redis.zscore(KEYS.active_jobs, job.id) is None
        assert await keys_without_ttl(submitter.redis) == []
    finally:
        await dying.close()
        await submitter.close()


async def test_a_job_finished_by_a_worker_that_died_before_announcing_is_announced(
    fault_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    skipped: list[str] = []

    async def died_after_commit(scripts: Any, job_id: str, event: str, *args: Any,
                                **kwargs: Any) -> bool:
        skipped.append(event)  # the worker died right after its commit
        return False

    monkeypatch.setattr(commits, "announce", died_after_commit)
    pipeline = Pipeline(fault_settings)
    try:
        async with running_worker(fault_settings):
            job = await pipeline.submit(texts(), JobOptions())
            await wait_finished(pipeline, job.id)
        assert skipped == ["job.completed"]
        assert await feed_events(pipeline.redis, job.id) == ["job.created"]
        await settle(pipeline, fault_settings)
        assert await feed_events(pipeline.redis, job.id) == ["job.created", "job.completed"]
        assert await pipeline.redis.zscore(KEYS.active_jobs, job.id) is None
    finally:
        await pipeline.close()
