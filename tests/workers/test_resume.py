"""A worker that loses Redis mid-round takes up what it holds as soon as Redis answers.

The round's entries (claimed, read ahead, in a commit that failed) stay
pending in the worker's name. Resumed (`Lanes.resume`), they go on at once,
not after the visibility timeout, and the outage is not counted as a
delivery: only a dead worker's entries count one more when reclaimed. An
entry whose rounds keep failing so is resumed at most `max_deliveries`
times, then waits out the timeout like any other, and that reclaim counts.
"""

from typing import Any

import anyio
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder
from tests.support.workers import (
    BULK,
    assert_every_index_once,
    pending_count,
    poll,
    running,
    submit,
    texts_of,
    wait_end,
)
from workers.commits import Commits
from workers.upkeep import Upkeep
from workers.worker import Worker

pytestmark = pytest.mark.anyio


def failing_commits(monkeypatch: pytest.MonkeyPatch, times: int) -> list[int]:
    """The first `times` commits fail as if Redis had gone; the count of those made."""
    made: list[int] = []
    real_commit = Commits.commit

    async def commit(self: Commits, results: list[Any], entries: list[Any]) -> None:
        made.append(len(results))
        if len(made) <= times:
            raise RedisConnectionError("Connection closed by server.")
        await real_commit(self, results, entries)

    monkeypatch.setattr(Commits, "commit", commit)
    return made


def recorded_deliveries(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(chunk, deliveries) of every entry the worker processes, in order."""
    seen: list[tuple[int, int]] = []
    real_process = Worker.process

    async def process(self: Worker, entries: list[Any], interruptible: bool = True) -> None:
        seen.extend((e.chunk, e.deliveries) for e in entries)
        await real_process(self, entries, interruptible)

    monkeypatch.setattr(Worker, "process", process)
    return seen


async def test_a_round_lost_with_redis_goes_on_at_once_and_counts_no_delivery(
    fast_settings: Settings, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    patient = fast_settings.replace(visibility_timeout_s=60.0)  # only a resume explains it
    texts = texts_of(1, 32)  # four batches of two chunks: the first commit fails
    job_id = await submit(pipeline, texts)
    made = failing_commits(monkeypatch, times=1)
    seen = recorded_deliveries(monkeypatch)
    async with running(patient, HashEmbedder(patient)):
        end = await wait_end(pipeline, job_id, timeout_s=15)
        await poll(lambda: _nothing_pending(pipeline))
    assert (end["status"], end["done"], end["failed"]) == ("completed", 32, 0)
    assert len(made) > 4  # the failed commit's chunks were committed after it
    assert {deliveries for _, deliveries in seen} == {1}
    await assert_every_index_once(pipeline, job_id, texts)


async def test_an_entry_whose_rounds_keep_failing_is_resumed_at_most_max_deliveries_times(
    fast_settings: Settings, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = texts_of(1, 4)  # one chunk
    job_id = await submit(pipeline, texts)
    failing_commits(monkeypatch, times=fast_settings.max_deliveries + 2)
    seen = recorded_deliveries(monkeypatch)
    async with running(fast_settings, HashEmbedder(fast_settings)) as run:
        run.worker.overlap = False  # each commit fails in its own round
        end = await wait_end(pipeline, job_id, timeout_s=20)
    assert (end["status"], end["done"], end["failed"]) == ("completed", 4, 0)
    # Taken, then resumed three times without a count; then reclaimed after the
    # visibility timeout, counted: twice (the second attempt's commit is the last to fail).
    assert seen == [(0, 1)] * (1 + fast_settings.max_deliveries) + [(0, 2), (0, 3)]
    await assert_every_index_once(pipeline, job_id, texts)


async def test_a_worker_killed_after_resuming_its_entries_loses_nothing(
    fast_settings: Settings, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = texts_of(1, 16)
    job_id = await submit(pipeline, texts)
    failing_commits(monkeypatch, times=1)
    died = anyio.Event()
    real_resume = Upkeep.resume_own

    async def resume_own(self: Upkeep) -> list[Any]:
        resumed = await real_resume(self)  # re-leased in its name...
        if self.worker_id == "doomed":
            died.set()
            await anyio.sleep_forever()  # ...and it dies before it starts them
        return resumed

    monkeypatch.setattr(Upkeep, "resume_own", resume_own)
    async with running(fast_settings, HashEmbedder(fast_settings), "doomed") as doomed:
        with anyio.fail_after(10):
            await died.wait()
        assert await pending_count(pipeline.redis, BULK) > 0
        await doomed.kill()
    async with running(fast_settings, HashEmbedder(fast_settings)):
        end = await wait_end(pipeline, job_id)
        await poll(lambda: _nothing_pending(pipeline))
    assert (end["status"], end["done"], end["failed"]) == ("completed", 16, 0)
    await assert_every_index_once(pipeline, job_id, texts)


async def _nothing_pending(pipeline: Pipeline) -> bool:
    return await pending_count(pipeline.redis, BULK) == 0
