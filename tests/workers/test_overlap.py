"""The commit of one bulk batch runs while the model embeds the next.

A fake model that takes 50 ms a call and a commit slowed by 50 ms: with the
commit behind, some commit and some model call are under way at the same
moment; with it off (the old order: embed, commit, embed), never. Either way
every index arrives exactly once.
"""

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from fakes import HashEmbedder
from test_worker_recovery import assert_every_index_once, quick, running, submit, texts_of, wait_end

from pipeline.service import Pipeline
from pipeline.settings import Settings
from workers.worker import Worker

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
def fast_settings(settings: Settings) -> Settings:
    # Claims of 8 texts in two chunks of 4: a 32-text job is four batches, four commits.
    return quick(settings).replace(batch_max_texts=8, call_max_texts=8)


@pytest.fixture
async def pipeline(fast_settings: Settings) -> AsyncIterator[Pipeline]:
    service = Pipeline(fast_settings)
    try:
        yield service
    finally:
        await service.close()


def overlapping(a: list[Span], b: list[Span]) -> int:
    return sum(1 for a0, a1 in a for b0, b1 in b if a0 < b1 and b0 < a1)


@pytest.mark.parametrize("behind", [True, False], ids=["commit-behind", "commit-in-line"])
async def test_a_bulk_commit_runs_while_the_model_embeds_the_next_batch(
    fast_settings: Settings, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, behind: bool
) -> None:
    embedder = TimedEmbedder(fast_settings, delay_s=0.05)
    commits: list[Span] = []
    real_commit = Worker.commit

    async def slow_commit(self: Worker, results: list[Any], entries: list[Any]) -> None:
        started = time.monotonic()
        await asyncio.sleep(0.05)
        await real_commit(self, results, entries)
        commits.append((started, time.monotonic()))

    monkeypatch.setattr(Worker, "commit", slow_commit)
    texts = texts_of(1, 32)
    async with running(fast_settings, embedder) as run:
        run.worker.commit_behind = behind
        job_id = await submit(pipeline, texts)
        end = await wait_end(pipeline, job_id)
    assert end["status"] == "completed" and len(commits) == 4
    assert len(embedder.spans) == 4
    if behind:
        assert overlapping(commits, embedder.spans) >= 2
    else:
        assert overlapping(commits, embedder.spans) == 0
    await assert_every_index_once(pipeline, job_id, texts)
