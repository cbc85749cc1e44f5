"""The job janitor: a job that cannot finish ends failed with a reason, and is announced once."""

import asyncio
from typing import Any

import anyio
import orjson
import pytest

from pipeline.errors import InvalidInput
from pipeline.inputs import Item, JobOptions, parse_options, parse_query_options
from pipeline.jobs import janitor
from pipeline.jobs.record import JobRecord, JobStatus
from pipeline.keys import Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import fake_model_info
from workers.upkeep import Upkeep

pytestmark = pytest.mark.anyio

KEYS = Keys("es")


async def feed_types(pipeline: Pipeline, job_id: str) -> list[str]:
    return [fields[b"type"].decode() for _, fields in await pipeline.redis.xrange(KEYS.feed)
            if orjson.loads(fields[b"data"]).get("id") == job_id]


async def expire_after(pipeline: Pipeline, job_id: str, timeout_s: float) -> JobRecord:
    """Sweep until the job is no longer queued (it must end within its timeout, plus slack)."""
    with anyio.fail_after(timeout_s + 10):
        while True:
            await janitor.sweep_jobs(pipeline.scripts, pipeline.settings)
            job = await pipeline.job(job_id)
            if job.status is not JobStatus.QUEUED:
                return job
            await anyio.sleep(0.05)


async def test_a_job_no_live_worker_serves_ends_failed_saying_so(settings: Settings) -> None:
    pipeline = Pipeline(settings)
    try:
        job = await pipeline.submit([Item("a"), Item("b")], JobOptions(timeout_s=0.3))
        first = await janitor.sweep_jobs(pipeline.scripts, settings)
        assert first.timed_out == 0 and (await pipeline.job(job.id)).status == "queued"
        end = await expire_after(pipeline, job.id, 0.3)
        assert end.status == "failed" and end.finished_at is not None
        assert f"no live worker serves model {DEFAULT_MODEL}" in end.error
        events = [f[b"type"] for _, f in await pipeline.redis.xrange(KEYS.events(job.id))]
        assert events == [b"end"]
        await janitor.sweep_jobs(pipeline.scripts, settings)
        assert await feed_types(pipeline, job.id) == ["job.created", "job.failed"]
        assert await pipeline.redis.zscore(KEYS.active_jobs, job.id) is None
        for key in KEYS.job_keys(job.id):
            ttl = await pipeline.redis.ttl(key)
            assert ttl == -2 or 0 < ttl <= settings.result_ttl_s
    finally:
        await pipeline.close()


async def test_a_job_that_stalls_under_a_live_worker_ends_failed_saying_so(
    settings: Settings,
) -> None:
    pipeline = Pipeline(settings)
    upkeep = Upkeep(pipeline.redis, KEYS, settings, "stalled-worker",
                    fake_model_info(DEFAULT_MODEL), KEYS.layout(DEFAULT_MODEL))
    try:
        await upkeep.beat()  # a live worker serving the model, which never takes the job
        job = await pipeline.submit([Item("a")], JobOptions(timeout_s=0.3))
        end = await expire_after(pipeline, job.id, 0.3)
        assert end.status == "failed"
        assert "no progress within the job's timeout of 0.3 s" in end.error
        assert f"a live worker serves {DEFAULT_MODEL}" in end.error
    finally:
        await pipeline.close()


async def test_many_janitors_at_once_fail_and_announce_a_job_once(settings: Settings) -> None:
    pipelines = [Pipeline(settings) for _ in range(4)]
    try:
        job = await pipelines[0].submit([Item("a")], JobOptions(timeout_s=0.2))
        await anyio.sleep(0.3)
        sweeps = await asyncio.gather(*(janitor.sweep_jobs(p.scripts, settings)
                                        for p in pipelines for _ in range(3)))
        assert sum(s.timed_out for s in sweeps) == 1
        assert await feed_types(pipelines[0], job.id) == ["job.created", "job.failed"]
        events = await pipelines[0].redis.xrange(KEYS.events(job.id))
        assert [f[b"type"] for _, f in events] == [b"end"]
    finally:
        for pipeline in pipelines:
            await pipeline.close()


async def test_jobs_take_the_servers_timeout_unless_they_give_their_own(
    settings: Settings,
) -> None:
    pipeline = Pipeline(settings.replace(job_timeout_s=123.0))
    try:
        own = await pipeline.submit([Item("a")], JobOptions(timeout_s=7.5))
        default = await pipeline.submit([Item("a")], JobOptions())
        assert (await pipeline.job(own.id)).timeout_s == 7.5
        assert (await pipeline.job(default.id)).timeout_s == 123.0
        # Keys live as long as the job may wait, then as long as its results.
        ttl = await pipeline.redis.ttl(KEYS.job(default.id))
        assert settings.result_ttl_s < ttl <= settings.result_ttl_s + 123
    finally:
        await pipeline.close()


@pytest.mark.parametrize("value", [0, -1, "5", True, 10**9, float("nan")])
def test_a_bad_timeout_is_rejected(value: Any) -> None:
    with pytest.raises(InvalidInput, match="timeout_s"):
        parse_options({"timeout_s": value})


def test_a_timeout_in_the_query_string_is_read_as_seconds() -> None:
    assert parse_query_options({"timeout_s": "2.5"}).timeout_s == 2.5
    assert parse_query_options({"timeout_s": ""}).timeout_s is None
    for bad in ("soon", "inf", "nan", "0"):
        with pytest.raises(InvalidInput, match="timeout_s"):
            parse_query_options({"timeout_s": bad})
