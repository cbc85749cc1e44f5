"""Redis work overlaps the model's: the next bulk batch is read and loaded, and the
last one committed (or the last requests answered), while the model embeds.

A fake model that takes 50 ms a call and a commit slowed by 50 ms: with the
commit behind, some commit and some model call are under way at the same
moment; with it off (the old order: embed, commit, embed), never. The next
batch is claimed during the last model call of the one before. Either way
every index arrives exactly once, and a worker that stops hands back what it
read ahead.
"""

import asyncio
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from pipeline.inputs import Item, JobOptions
from pipeline.keys import GROUP
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import GateEmbedder, HashEmbedder
from tests.support.workers import (
    BULK,
    assert_every_index_once,
    create_groups,
    running,
    submit,
    texts_of,
    wait_end,
    wait_entered,
)
from workers.claims import ReadAhead
from workers.commits import Commits
from workers.model_calls import ModelCalls

pytestmark = pytest.mark.anyio

Span = tuple[float, float]


class TimedEmbedder(HashEmbedder):
    """Each call takes `delay_s`; records when each call ran."""

    def __init__(self, settings: Settings, delay_s: float) -> None:
        super().__init__(settings)
        self.delay_s = delay_s
        self.spans: list[Span] = []
        self._spans_lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> Any:
        started = time.monotonic()
        time.sleep(self.delay_s)
        embedded = super().embed(texts)
        with self._spans_lock:
            self.spans.append((started, time.monotonic()))
        return embedded


@pytest.fixture
def fast_settings(fast_settings: Settings) -> Settings:
    """The shared fast settings, with model calls as large as a batch."""
    # Claims of 8 texts in two chunks of 4: a 32-text job is four batches, four commits.
    return fast_settings.replace(batch_max_texts=8, call_max_texts=8)


def slow_commits(monkeypatch: pytest.MonkeyPatch) -> list[Span]:
    """Slow every commit by 50 ms; the spans of those made, filled in as they end."""
    commits: list[Span] = []
    real_commit = Commits.commit

    async def slow_commit(self: Commits, results: list[Any], entries: list[Any]) -> None:
        started = time.monotonic()
        await asyncio.sleep(0.05)
        await real_commit(self, results, entries)
        commits.append((started, time.monotonic()))

    monkeypatch.setattr(Commits, "commit", slow_commit)
    return commits


def where_called(monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> list[str]:
    """The first word of the task's name ("read-ahead", ...) at each call of the method."""
    called: list[str] = []
    real = getattr(owner, name)

    async def recorded(self: Any, *args: Any) -> Any:
        task = asyncio.current_task()
        called.append(task.get_name().split()[0] if task is not None else "")
        return await real(self, *args)

    monkeypatch.setattr(owner, name, recorded)
    return called


def overlapping(a: list[Span], b: list[Span]) -> int:
    return sum(1 for a0, a1 in a for b0, b1 in b if a0 < b1 and b0 < a1)


@pytest.mark.parametrize("behind", [True, False], ids=["commit-behind", "commit-in-line"])
async def test_a_bulk_commit_runs_while_the_model_embeds_the_next_batch(
    fast_settings: Settings, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, behind: bool
) -> None:
    embedder = TimedEmbedder(fast_settings, delay_s=0.05)
    commits = slow_commits(monkeypatch)
    reads: list[Span] = []
    real_read_ahead = ReadAhead.read

    async def read_ahead(self: ReadAhead) -> Any:
        started = time.monotonic()
        found = await real_read_ahead(self)
        if found[0]:
            reads.append((started, time.monotonic()))
        return found

    monkeypatch.setattr(ReadAhead, "read", read_ahead)
    prepared = where_called(monkeypatch, Commits, "prepare")  # where each batch was loaded
    looked_up = where_called(monkeypatch, ModelCalls, "look_up")  # and looked up
    texts = texts_of(1, 32)
    async with running(fast_settings, embedder) as run:
        run.worker.overlap = behind
        job_id = await submit(pipeline, texts)
        end = await wait_end(pipeline, job_id)
    assert end["status"] == "completed" and len(commits) == 4
    assert len(embedder.spans) == 4
    if behind:
        assert overlapping(commits, embedder.spans) >= 2
        # Batches 2, 3 and 4 were each read, loaded and their job marked running
        # while the model embedded the one before; only batch 1 was loaded in line.
        assert len(reads) == 3 and overlapping(reads, embedder.spans) == 3
        assert prepared.count("read-ahead") == 3 and len(prepared) == 4
        assert looked_up == ["read-ahead"] * 3
    else:
        assert overlapping(commits, embedder.spans) == 0
        assert reads == [] and "read-ahead" not in prepared and len(prepared) == 4
        assert looked_up == []
    await assert_every_index_once(pipeline, job_id, texts)


@pytest.mark.parametrize("behind", [True, False], ids=["replies-behind", "replies-in-line"])
async def test_replies_to_requests_are_sent_while_the_model_embeds_the_next_ones(
    fast_settings: Settings, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, behind: bool
) -> None:
    embedder = TimedEmbedder(fast_settings, delay_s=0.05)
    commits = slow_commits(monkeypatch)
    # Four requests of 8 texts, each one claim's worth: four rounds of the fast lane,
    # each in two model calls (a request's calls are half the budget).
    settings = fast_settings.replace(fast_lane_max_texts=8)
    asked = [[f"request {r} text {i}" for i in range(8)] for r in range(4)]
    requests = Pipeline(settings)
    try:
        await create_groups(requests.redis)
        async with running(settings, embedder) as run:
            run.worker.overlap = behind
            answers = await asyncio.gather(*(
                requests.embed([Item(t) for t in texts], JobOptions()) for texts in asked))
    finally:
        await requests.close()
    assert [a.done for a in answers] == [8, 8, 8, 8]
    assert [k async for k in pipeline.redis.scan_iter(match="es:{*}:job")] == []  # no job
    assert len(embedder.spans) == 8 and len(commits) == 4
    if behind:
        assert overlapping(commits, embedder.spans) >= 2
    else:
        assert overlapping(commits, embedder.spans) == 0


async def test_a_stopping_worker_hands_back_the_batch_it_read_ahead(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    patient = fast_settings.replace(visibility_timeout_s=60.0)
    await create_groups(pipeline.redis)
    texts = texts_of(1, 24)  # three batches of 8
    job_id = await submit(pipeline, texts)
    gate = GateEmbedder(patient)
    try:
        async with running(patient, gate, worker_id="worker-1") as run:
            await wait_entered(gate)  # batch 1 in the model, batch 2 read ahead
            run.stop.set()
            gate.open()
            await asyncio.wait_for(run.task, 10)
    finally:
        gate.open()
    assert gate.calls == [texts[:8]]
    job = await pipeline.job(job_id)
    assert job.done == 8
    # Batch 2's two chunks were read ahead and are handed back: idle past the
    # timeout, and the delivery that was no attempt is not counted.
    rows = await pipeline.redis.xpending_range(BULK, GROUP, "-", "+", 10)
    assert [(r["consumer"], r["times_delivered"]) for r in rows] == [(b"worker-1", 0)] * 2
    assert all(r["time_since_delivered"] >= 60_000 for r in rows)
    peer = HashEmbedder(patient)  # a minute's visibility timeout: only a release explains it
    async with running(patient, peer):
        await wait_end(pipeline, job_id, timeout_s=10)
    await assert_every_index_once(pipeline, job_id, texts)
    assert sorted(peer.embedded_texts) == sorted(texts[8:])
