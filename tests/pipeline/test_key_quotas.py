"""Per-key quotas: one API key at its quota is refused (429, naming the variable) while
another key's job is accepted and completes; a request that can never be accepted is a 413."""

from collections.abc import AsyncIterator

import anyio
import pytest

from pipeline.errors import Overloaded, PayloadTooLarge
from pipeline.inputs import Item, JobOptions
from pipeline.jobs.tenants import Caller
from pipeline.keys import Keys
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder
from tests.support.faults import Died, dying_at
from tests.support.rest import assert_error, serving
from tests.support.timings import quick
from tests.support.workers import running, texts_of, wait_end

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
A, B = Caller("a" * 16), Caller("b" * 16)


def items(n: int, job: int = 0) -> list[Item]:
    return [Item(text) for text in texts_of(job, n)]


async def test_a_key_at_its_job_quota_is_refused_while_another_keys_job_completes(
    settings: Settings,
) -> None:
    quota = quick(settings).replace(key_quota_jobs=2, calibrate=False)
    pipeline = Pipeline(quota)
    try:
        held = [await pipeline.submit(items(3, i), JobOptions(), caller=B) for i in range(2)]
        with pytest.raises(Overloaded, match="EMBEDSTREAM_KEY_QUOTA_JOBS") as refused:
            await pipeline.submit(items(3, 9), JobOptions(), caller=B)
        assert refused.value.detail["retry_after_s"] >= 1
        assert await pipeline.redis.zcard(KEYS.owner_jobs(B.owner)) == 2  # the refused unlisted
        job = await pipeline.submit(items(5, 7), JobOptions(), caller=A)
        async with running(quota, HashEmbedder(quota)):
            assert (await wait_end(pipeline, job.id))["status"] == "completed"
            for other in held:  # B's finished jobs free its quota by themselves
                await wait_end(pipeline, other.id)
        again = await pipeline.submit(items(3, 9), JobOptions(), caller=B)
        assert again.total == 3
        assert await pipeline.redis.zcard(KEYS.owner_jobs(B.owner)) == 1
    finally:
        await pipeline.close()


async def test_a_key_past_its_text_quota_is_refused_streamed_or_not(settings: Settings) -> None:
    pipeline = Pipeline(settings.replace(key_quota_texts=10, chunk_size=4))
    try:
        await pipeline.submit(items(8), JobOptions(), caller=B)
        with pytest.raises(Overloaded, match="EMBEDSTREAM_KEY_QUOTA_TEXTS"):
            await pipeline.submit(items(3, 1), JobOptions(), caller=B)

        async def streamed() -> AsyncIterator[Item]:
            for item in items(3, 2):
                yield item
        writer = await pipeline.writer(JobOptions(), B)
        with pytest.raises(Overloaded, match="8 texts waiting"):
            await pipeline.commit(writer, streamed())
        assert not await pipeline.redis.exists(KEYS.inputs(writer.job_id))
        assert (await pipeline.submit(items(2, 3), JobOptions(), caller=B)).total == 2
        assert (await pipeline.submit(items(10, 4), JobOptions(), caller=A)).total == 10
    finally:
        await pipeline.close()


async def test_a_job_larger_than_the_text_quota_is_a_413_at_the_input_that_passes_it(
    settings: Settings,
) -> None:
    pipeline = Pipeline(settings.replace(key_quota_texts=5, chunk_size=2))
    try:
        with pytest.raises(PayloadTooLarge, match="EMBEDSTREAM_KEY_QUOTA_TEXTS"):
            await pipeline.submit(items(6), JobOptions(), caller=B)
        sent: list[int] = []

        async def endless() -> AsyncIterator[Item]:
            for i in range(1000):
                sent.append(i)
                yield Item(f"text {i}")
        writer = await pipeline.writer(JobOptions(), B)
        with pytest.raises(PayloadTooLarge):
            await pipeline.commit(writer, endless())
        assert len(sent) == 6
    finally:
        await pipeline.close()


async def test_the_trusted_caller_has_no_quota(settings: Settings) -> None:
    pipeline = Pipeline(settings.replace(key_quota_jobs=1, key_quota_texts=2))
    try:
        for i in range(3):
            assert (await pipeline.submit(items(3, i), JobOptions())).total == 3
        assert await pipeline.redis.exists(KEYS.owner_jobs("")) == 0
    finally:
        await pipeline.close()


async def test_a_job_over_max_inputs_is_a_413_even_when_the_queue_is_full(
    settings: Settings,
) -> None:
    pipeline = Pipeline(settings.replace(max_backlog=8, chunk_size=4, max_inputs=20))
    try:
        await pipeline.submit(items(8), JobOptions())
        with pytest.raises(Overloaded):
            await pipeline.submit(items(4, 1), JobOptions())
        with pytest.raises(PayloadTooLarge, match="at most 20 inputs"):
            await pipeline.submit(items(21, 2), JobOptions())
    finally:
        await pipeline.close()


async def test_a_refusal_over_http_is_a_429_with_retry_after_naming_the_variable(
    settings: Settings,
) -> None:
    secured = settings.replace(api_keys=("key-a", "key-b"), key_quota_jobs=1)
    async with serving(secured) as client:
        def auth(key: str) -> dict[str, str]:
            return {"authorization": f"Bearer {key}"}
        body = {"inputs": ["one", "two"]}
        first = await client.post("/v1/jobs", json=body, headers=auth("key-b"))
        assert first.status_code == 202, first.text
        refused = await client.post("/v1/jobs", json=body, headers=auth("key-b"))
        assert_error(refused, 429, "overloaded", "EMBEDSTREAM_KEY_QUOTA_JOBS")
        assert int(refused.headers["retry-after"]) >= 1
        other = await client.post("/v1/jobs", json=body, headers=auth("key-a"))
        assert other.status_code == 202, other.text


@pytest.mark.parametrize("step", ["listed", "staged", "enqueued"])
async def test_a_submitter_killed_after_listing_its_job_frees_the_quota_by_itself(
    settings: Settings, step: str
) -> None:
    """Listing a job under its key and writing it are separate steps; a submitter
    killed between them (or later) leaves a listing that counts until its deadline
    (twice the staging TTL) and then frees the quota, and nothing else is stuck."""
    quota = settings.replace(key_quota_jobs=1, chunk_size=4, staging_ttl_s=1,
                             calibrate=False)
    dying, pipeline = Pipeline(quota), Pipeline(quota)
    try:
        dying_at(dying, step)
        with pytest.raises(Died):
            await dying.submit(items(6), JobOptions(), caller=B)
        listed = await pipeline.redis.zrange(KEYS.owner_jobs(B.owner), 0, -1)
        assert len(listed) == 1
        with pytest.raises(Overloaded, match="EMBEDSTREAM_KEY_QUOTA_JOBS"):
            await pipeline.submit(items(3, 1), JobOptions(), caller=B)
        other = await pipeline.submit(items(3, 2), JobOptions(), caller=A)  # not A's quota
        assert other.total == 3
        await anyio.sleep(2 * quota.staging_ttl_s + 0.2)
        again = await pipeline.submit(items(3, 1), JobOptions(), caller=B)
        assert again.total == 3
        assert await pipeline.redis.zrange(KEYS.owner_jobs(B.owner), 0, -1) == [
            again.id.encode()]
    finally:
        await pipeline.close()
        await dying.close()
