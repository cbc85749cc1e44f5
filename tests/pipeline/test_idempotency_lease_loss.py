"""One Idempotency-Key, one job: an upload that stalls past its lease while another server
takes the key over stops with a retryable error, and its retry gets the other's job.

Two Pipelines on one Redis stand for two servers. The first one's stall is
injected: its lease renewal waits on a gate (as under SIGSTOP), so its lease
lapses and the second takes the key.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest

from pipeline.errors import Conflict, JobNotFound
from pipeline.inputs import Item, JobOptions
from pipeline.jobs.record import JobRecord
from pipeline.keys import Keys
from pipeline.service import Pipeline
from pipeline.settings import Settings

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
KEY = "one-key-one-job"
TOTAL = 10


@pytest.fixture
def lease_settings(settings: Settings) -> Settings:
    return settings.replace(chunk_size=4, idempotency_lease_s=0.3, calibrate=False)


def texts() -> list[Item]:
    return [Item(f"text number {i}", f"id-{i}") for i in range(TOTAL)]


def stall_renewal(pipeline: Pipeline) -> asyncio.Event:
    """Hold the pipeline's lease renewals until the returned event is set."""
    resume = asyncio.Event()
    renew = pipeline.idempotency.renew

    async def stalled(*args: Any) -> bool:
        await resume.wait()
        return await renew(*args)
    pipeline.idempotency.renew = stalled  # type: ignore[method-assign]
    return resume


async def take_over(settings: Settings) -> JobRecord:
    """The retry on the second server: 409 while the first's lease lives, then its own job."""
    second = Pipeline(settings)
    try:
        with anyio.fail_after(10):
            while True:
                try:
                    return await second.submit(texts(), JobOptions(), idempotency_key=KEY)
                except Conflict:
                    await anyio.sleep(0.05)
    finally:
        await second.close()


async def visible_jobs(pipeline: Pipeline) -> set[str]:
    jobs = set()
    async for key in pipeline.redis.scan_iter(match="es:{*}:job"):
        if await pipeline.redis.hget(key, "status") != b"staged":
            jobs.add(key.decode().split("{")[1].split("}")[0])
    return jobs


async def test_an_upload_that_lost_its_key_stops_and_its_retry_gets_the_one_job(
    lease_settings: Settings,
) -> None:
    first = Pipeline(lease_settings)
    try:
        resume = stall_renewal(first)
        taken = asyncio.Event()

        async def upload() -> AsyncIterator[Item]:
            for i, item in enumerate(texts()):
                if i == TOTAL // 2:
                    await taken.wait()  # the first server is stopped mid-upload
                yield item

        writer = await first.writer(JobOptions())
        stopped = asyncio.create_task(first.commit(writer, upload(), KEY))
        other = await take_over(lease_settings)
        resume.set()
        taken.set()
        with pytest.raises(Conflict, match="retry with the same key"):
            await stopped
        assert await visible_jobs(first) == {other.id}
        assert not await first.redis.exists(KEYS.job(writer.job_id),
                                            KEYS.inputs(writer.job_id))
        again = await first.submit(texts(), JobOptions(), idempotency_key=KEY)
        assert again.id == other.id
    finally:
        await first.close()


async def test_a_job_made_visible_after_its_key_was_taken_is_withdrawn(
    lease_settings: Settings,
) -> None:
    first = Pipeline(lease_settings)
    try:
        activate: Callable[..., Awaitable[Any]] = first.scripts.activate
        others: list[JobRecord] = []

        async def stalled_activate(*args: Any) -> Any:
            # The stall falls between the lease's last check and the activation.
            stall_renewal(first)
            others.append(await take_over(lease_settings))
            return await activate(*args)
        first.scripts.activate = stalled_activate  # type: ignore[method-assign]
        writer = await first.writer(JobOptions())
        with pytest.raises(Conflict, match="retry with the same key"):
            await first.commit(writer, texts(), KEY)
        with pytest.raises(JobNotFound):
            await first.job(writer.job_id)
        assert await visible_jobs(first) == {others[0].id}
        first.scripts.activate = activate  # type: ignore[method-assign]
        again = await first.submit(texts(), JobOptions(), idempotency_key=KEY)
        assert again.id == others[0].id
    finally:
        await first.close()
