"""A job that finishes (or vanishes) while its follower's blocking read times out.

The job hub's XREAD times out, then the job's last chunk is committed and
the job finishes, then the hub checks the status (`on_idle`). The wrapper
below makes that interleaving certain; Redis itself is real. A job deleted
or expired under its follower ends the stream, not the hub's reader with an
error nobody reads.
"""

import asyncio
import contextlib
from typing import Any

import anyio
import numpy as np
import pytest

from pipeline.inputs import Item, JobOptions
from pipeline.jobs.events import ChunkRows, follow_job_live
from pipeline.jobs.quantize import FLOAT
from pipeline.jobs.results import ChunkResult
from pipeline.jobs.scripts import JobScripts
from pipeline.jobs.submission import JobWriter
from pipeline.keys import Keys
from pipeline.model.info import ModelInfo
from pipeline.settings import Settings
from pipeline.store.connections import connect
from pipeline.store.fanout import Hubs

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
INFO = ModelInfo("fake-model", 4, 16)


class FinishDuringTimeout:
    """A blocking client whose first timed-out read lets the job finish meanwhile."""

    def __init__(self, real: Any, finish: Any) -> None:
        self.real = real
        self.finish = finish
        self.timeouts = 0

    async def xread(self, streams: dict[str, str], **kwargs: Any) -> Any:
        reply = await self.real.xread(streams, **{**kwargs, "block": 1})
        if not reply and self.finish is not None:
            self.timeouts += 1
            finish, self.finish = self.finish, None
            await finish()
        return reply


async def test_results_committed_between_a_read_timeout_and_the_status_check_are_delivered(
    any_redis_url: str,
) -> None:
    redis = connect(any_redis_url)
    try:
        settings = Settings(redis_url=any_redis_url, chunk_size=2)
        writer = JobWriter(redis, KEYS, settings, JobOptions(), INFO)
        await writer.add_many(Item(f"text {i}") for i in range(4))
        job_id = (await writer.commit()).id

        async def commit(chunk: int) -> None:
            result = ChunkResult(job_id, chunk, np.ones((2, 4), np.float32), [None, None],
                                 [], {}, 4)
            async with redis.pipeline(transaction=False) as pipe:
                await JobScripts(redis, KEYS).queue_commit(pipe, result, 3600)
                await pipe.execute()

        async def finish() -> None:
            await commit(1)

        await commit(0)
        blocking = FinishDuringTimeout(redis, None)
        hubs = Hubs(redis, blocking, block_ms=1, buffer=100)
        events = []
        try:
            async for event in follow_job_live(redis, hubs, KEYS, ChunkRows(redis, KEYS), job_id,
                                               view=FLOAT):
                events.append(event)
                if event.name == "progress" and event.data["done"] == 2:
                    blocking.finish = finish  # the next read times out, then the job ends
        finally:
            await hubs.close()
        indexes = [row["index"] for e in events if e.name == "result" for row in e.data]
        assert blocking.timeouts == 1
        assert indexes == [0, 1, 2, 3]
        assert events[-1].name == "end" and events[-1].data["status"] == "completed"
    finally:
        await redis.aclose()


async def test_a_followed_job_that_vanishes_ends_its_stream_without_an_error(
    any_redis_url: str,
) -> None:
    """A job deleted or expired under a follower: the stream ends, the reader exits cleanly."""
    redis = connect(any_redis_url)
    try:
        writer = JobWriter(redis, KEYS, Settings(redis_url=any_redis_url, chunk_size=2),
                           JobOptions(), INFO)
        await writer.add_many(Item(f"text {i}") for i in range(4))
        job_id = (await writer.commit()).id
        hubs = Hubs(redis, redis, block_ms=50, buffer=100)
        events = []
        try:
            follower = follow_job_live(redis, hubs, KEYS, ChunkRows(redis, KEYS), job_id,
                                       view=FLOAT)
            with anyio.fail_after(10):
                following = asyncio.ensure_future(anext(follower))
                while (hub := hubs.find(KEYS.events(job_id))) is None:
                    await asyncio.sleep(0.01)
                await hub.ready()
                await redis.delete(*KEYS.job_keys(job_id))
                with contextlib.suppress(StopAsyncIteration):
                    events.append(await following)
                    events.extend([event async for event in follower])
                while not hub.stopped:
                    await asyncio.sleep(0.01)
            reader = hub._reader
            assert reader is not None and reader.done() and reader.exception() is None
        finally:
            await hubs.close()
        assert events == []
    finally:
        await redis.aclose()
