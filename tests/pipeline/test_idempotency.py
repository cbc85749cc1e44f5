"""Idempotency-Key: a retry gets the same job, even one still being written."""

import pytest

from pipeline.errors import Conflict, IdempotencyKeyReused
from pipeline.inputs import Item, JobOptions
from pipeline.jobs.idempotency import Hold
from pipeline.jobs.record import new_job_id
from pipeline.service import Pipeline
from pipeline.settings import Settings

pytestmark = pytest.mark.anyio


async def test_a_retry_during_the_first_submission_gets_a_409_not_a_missing_job(
    settings: Settings,
) -> None:
    pipeline = Pipeline(settings)
    try:
        # The first submission has claimed the key but not yet written its job.
        in_flight = new_job_id()
        assert (await pipeline.idempotency.claim("", "k1", in_flight)).hold is Hold.TAKEN
        with pytest.raises(Conflict, match="retry in a moment"):
            await pipeline.submit([Item("hello")], JobOptions(), idempotency_key="k1")
    finally:
        await pipeline.close()


async def test_a_retry_after_the_first_submission_returns_its_job(settings: Settings) -> None:
    pipeline = Pipeline(settings)
    try:
        first = await pipeline.submit([Item("hello"), Item("world", "w")], JobOptions(),
                                      idempotency_key="k2")
        again = await pipeline.submit([Item("hello"), Item("world", "w")], JobOptions(),
                                      idempotency_key="k2")
        assert again.id == first.id and again.total == 2
        assert await pipeline.redis.hlen(pipeline.keys.inputs(first.id)) == 1
    finally:
        await pipeline.close()


@pytest.mark.parametrize("other", [
    ([Item("other")], JobOptions()),
    ([Item("hello", "an-id")], JobOptions()),
    ([Item("hello")], JobOptions(dimensions=64)),
])
async def test_a_key_reused_for_another_request_is_a_422_naming_the_first_job(
    settings: Settings, other: tuple[list[Item], JobOptions]
) -> None:
    pipeline = Pipeline(settings)
    try:
        first = await pipeline.submit([Item("hello")], JobOptions(), idempotency_key="k3")
        with pytest.raises(IdempotencyKeyReused, match=first.id) as caught:
            await pipeline.submit(other[0], other[1], idempotency_key="k3")
        assert caught.value.status == 422
        jobs = [k async for k in pipeline.redis.scan_iter(match="es:{*}:job")]
        assert len(jobs) == 1, "the refused request left a job behind"
    finally:
        await pipeline.close()
