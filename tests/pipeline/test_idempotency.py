"""Idempotency-Key: a retry gets the same job, even one still being written."""

import pytest

from pipeline.errors import Conflict
from pipeline.inputs import Item, JobOptions
from pipeline.jobs import claim_idempotency_key, new_job_id
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
        assert await claim_idempotency_key(pipeline.redis, pipeline.keys, "", "k1", in_flight,
                                           60) is None
        with pytest.raises(Conflict, match="retry in a moment"):
            await pipeline.submit([Item("hello")], JobOptions(), idempotency_key="k1")
    finally:
        await pipeline.close()


async def test_a_retry_after_the_first_submission_returns_its_job(settings: Settings) -> None:
    pipeline = Pipeline(settings)
    try:
        first = await pipeline.submit([Item("hello")], JobOptions(), idempotency_key="k2")
        again = await pipeline.submit([Item("other")], JobOptions(), idempotency_key="k2")
        assert again["id"] == first["id"] and again["total"] == 1
        assert await pipeline.redis.hlen(pipeline.keys.inputs(first["id"])) == 1
    finally:
        await pipeline.close()
