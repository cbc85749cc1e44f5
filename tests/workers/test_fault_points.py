"""A worker or janitor killed between the steps of commit, sweep and trim.

The kill is a test-only hook: the step's method runs part of its work and
then the worker task is cancelled without its goodbye, which leaves Redis
exactly as a SIGKILL at that point would (the heartbeat expires, the entries
stay pending). Another worker then finishes the job: every index exactly
once, one result event per chunk, nothing left pending.
"""

import asyncio
from typing import Any

import anyio
import pytest

from pipeline.keys import GROUP
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder
from tests.support.workers import (
    BULK,
    KEYS,
    LAYOUT,
    assert_every_index_once,
    create_groups,
    feed_events,
    pending_count,
    poll,
    running,
    submit,
    texts_of,
    wait_end,
)
from workers.commits import Commits
from workers.upkeep import Upkeep

pytestmark = pytest.mark.anyio


class Died(Exception):
    """The process ended here."""


COMMIT_BOUNDARIES = {
    "before-any-commit": (0, 0),
    "between-the-chunks-of-one-commit": (1, 0),
    "between-the-commits-and-the-acks": (2, 0),
    "between-the-acks": (2, 1),
    "after-the-acks": (2, 2),  # the counter and the feed's progress events are skipped
}


@pytest.mark.parametrize(("commits", "acks"), COMMIT_BOUNDARIES.values(),
                         ids=COMMIT_BOUNDARIES.keys())
async def test_a_worker_killed_at_a_commit_boundary_loses_and_duplicates_nothing(
    fast_settings: Settings, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch,
    commits: int, acks: int,
) -> None:
    texts = texts_of(1, 16)  # four chunks of four; two chunks a model call
    job_id = await submit(pipeline, texts)  # queued whole before the doomed worker reads
    real_commit = Commits.commit
    died = asyncio.Event()
    batch: list[int] = []

    async def commit(self: Commits, results: list[Any], entries: list[Any]) -> None:
        if self.worker_id != "doomed":
            return await real_commit(self, results, entries)
        batch.append(len(results))
        await real_commit(self, results[:commits], entries[:acks])
        died.set()
        await asyncio.Event().wait()  # nothing more happens in a dead process

    monkeypatch.setattr(Commits, "commit", commit)
    async with running(fast_settings, HashEmbedder(fast_settings), "doomed") as doomed:
        with anyio.fail_after(10):
            await died.wait()
        await doomed.kill()
    assert batch == [2]
    # The commit ran in a task of its own (behind the next model call), as did the
    # read of the next batch: they died too.
    assert not [t for t in asyncio.all_tasks()
                if t.get_name() in ("commit doomed", "read-ahead doomed")]
    assert (await pipeline.job(job_id)).done == 4 * commits
    async with running(fast_settings, HashEmbedder(fast_settings)):
        await wait_end(pipeline, job_id)
        # The dead worker's entries, committed or not, are reclaimed and acked.
        await poll(lambda: _nothing_pending(pipeline))
    await assert_every_index_once(pipeline, job_id, texts)


READ_AHEAD_STEPS = ["after-the-read", "after-the-load", "after-marking-the-job-running"]


@pytest.mark.parametrize("step", READ_AHEAD_STEPS)
async def test_a_worker_killed_while_it_reads_ahead_and_loads_a_batch_loses_nothing(
    fast_settings: Settings, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    texts = texts_of(1, 16)  # two batches of two chunks: the second is read ahead
    job_id = await submit(pipeline, texts)
    died = asyncio.Event()
    real_prepare, real_mark_started = Commits.prepare, Commits.mark_started

    def ahead(commits: Commits) -> bool:
        task = asyncio.current_task()
        return commits.worker_id == "doomed" and task is not None \
            and task.get_name() == "read-ahead doomed"

    async def die() -> None:
        died.set()
        await asyncio.Event().wait()  # nothing more happens in a dead process

    async def prepare(self: Commits, entries: list[Any]) -> Any:
        if ahead(self) and step == "after-the-read":
            await die()
        loaded = await real_prepare(self, entries)
        if ahead(self) and step == "after-marking-the-job-running":
            await die()
        return loaded

    async def mark_started(self: Commits, job_ids: set[str]) -> None:
        if ahead(self) and step == "after-the-load":
            await die()
        await real_mark_started(self, job_ids)

    monkeypatch.setattr(Commits, "prepare", prepare)
    monkeypatch.setattr(Commits, "mark_started", mark_started)
    async with running(fast_settings, HashEmbedder(fast_settings), "doomed") as doomed:
        with anyio.fail_after(10):
            await died.wait()
        # The read-ahead holds batch 2: the worker waits for it before it goes on.
        assert await pending_count(pipeline.redis, BULK) >= 2
        await doomed.kill()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "read-ahead doomed"]
    assert (await pipeline.job(job_id)).status == "running"
    peer = HashEmbedder(fast_settings)
    async with running(fast_settings, peer):
        end = await wait_end(pipeline, job_id)
        await poll(lambda: _nothing_pending(pipeline))
    assert (end["status"], end["done"], end["failed"]) == ("completed", 16, 0)
    await assert_every_index_once(pipeline, job_id, texts)
    # The batch read ahead was never started: the peer embedded it (and batch 1's
    # chunks too, where the dead worker's commit had not landed).
    assert set(texts[8:]) <= set(peer.embedded_texts)


async def _nothing_pending(pipeline: Pipeline) -> bool:
    return await pending_count(pipeline.redis, BULK) == 0


JANITOR_STEPS = ["after-removing-the-worker-entry", "after-the-announcement",
                 "after-forgetting-consumers", "after-the-trim"]


@pytest.mark.parametrize("step", JANITOR_STEPS)
async def test_a_janitor_killed_between_the_steps_of_sweep_and_trim_loses_nothing(
    fast_settings: Settings, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    client = pipeline.redis
    await create_groups(client)
    texts = texts_of(2, 16)
    job_id = await submit(pipeline, texts)
    info = HashEmbedder(fast_settings).info
    dead = Upkeep(client, KEYS, fast_settings, "dead", info, LAYOUT)
    await dead.register()
    await client.xreadgroup(GROUP, "dead", {BULK: ">"}, count=2)  # then it died
    await client.delete(KEYS.heartbeat("dead"))
    janitor = Upkeep(client, KEYS, fast_settings, "janitor", info, LAYOUT)
    _die_at(monkeypatch, janitor, step)
    with pytest.raises(Died):
        await janitor.sweep_dead_workers()
        await janitor.trim_queues()
        raise Died
    assert await pending_count(client, BULK) == 2  # the dead worker's entries, unharmed
    downs = [d["id"] for t, d in await feed_events(client) if t == "worker.down"]
    # Dying between the two loses the announcement; the worker list is right regardless.
    assert downs == ([] if step == JANITOR_STEPS[0] else ["dead"])
    assert not await client.hexists(KEYS.workers, "dead")
    async with running(fast_settings, HashEmbedder(fast_settings)):
        await wait_end(pipeline, job_id)
    await assert_every_index_once(pipeline, job_id, texts)


class _DiesOnAnnouncing:
    """The janitor's client, dying at its first write to the feed."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)

    async def xadd(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name == KEYS.feed:
            raise Died
        return await self._redis.xadd(name, *args, **kwargs)


def _die_at(monkeypatch: pytest.MonkeyPatch, janitor: Upkeep, step: str) -> None:
    async def died(*_: Any, **__: Any) -> None:
        raise Died

    if step == "after-removing-the-worker-entry":
        monkeypatch.setattr(janitor, "redis", _DiesOnAnnouncing(janitor.redis))
    elif step == "after-the-announcement":
        monkeypatch.setattr(janitor, "forget_consumer", died)
    elif step == "after-forgetting-consumers":
        monkeypatch.setattr(janitor, "trim_queues", died)
