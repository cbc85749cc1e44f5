"""Shared helpers of the worker tests: a worker as a task, submitting, following, reading back.

In-process workers with fake embedders (`tests.support.fakes`) against a real
server; nothing sleeps to wait: helpers follow a job's events or poll with a
deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
import pytest

from pipeline.inputs import Item, JobOptions
from pipeline.keys import GROUP, Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.tasks import cancel_and_wait
from tests.support.fakes import GateEmbedder, expected_vector
from workers.worker import Worker

KEYS = Keys("es")
FAST, BULK = KEYS.queues(DEFAULT_MODEL)
LAYOUT = KEYS.layout(DEFAULT_MODEL)
DIMS = 384


@dataclass
class Running:
    worker: Worker
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def kill(self) -> None:
        """Stop the task at once, without the goodbye: the heartbeat is left to expire."""
        async def silent() -> None:
            return None

        self.worker.upkeep.deregister = silent  # type: ignore[method-assign]
        with anyio.fail_after(10):
            await cancel_and_wait(self.task)


@contextlib.asynccontextmanager
async def running(settings: Settings, embedder: Any, worker_id: str | None = None
                  ) -> AsyncIterator[Running]:
    """A Worker as a task, registered before the block starts, stopped cleanly after it."""
    async with Worker.start(settings, embedder, worker_id) as worker:
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(worker.run(stop, ready))
        waiting = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({task, waiting}, timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if task in done:
            task.result()
        assert ready.is_set(), "the worker did not start"
        try:
            yield Running(worker, stop, task)
        finally:
            stop.set()
            if not task.done():
                with anyio.fail_after(10):
                    await task


def texts_of(job: int, n: int) -> list[str]:
    return [f"job {job} text number {i}" for i in range(n)]


async def submit(pipeline: Pipeline, texts: Sequence[str], **options: Any) -> str:
    job = await pipeline.submit([Item(t, f"id-{i}") for i, t in enumerate(texts)],
                                JobOptions(**options))
    return job.id


async def wait_end(pipeline: Pipeline, job_id: str, timeout_s: float = 15) -> dict[str, Any]:
    """Follow the job's events until its end event."""
    with anyio.fail_after(timeout_s):
        async for event in pipeline.follow(job_id):
            if event.name == "end":
                return dict(event.data)
    raise AssertionError("the event stream ended without an end event")


async def all_rows(pipeline: Pipeline, job_id: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = await pipeline.results(job_id, cursor, limit=1000)
        rows.extend(page.rows)
        cursor = page.next_cursor
        if cursor is None:
            return rows


async def assert_every_index_once(pipeline: Pipeline, job_id: str, texts: list[str]) -> None:
    """Each input has exactly one row, with its own vector, and one result event per chunk."""
    job = await pipeline.job(job_id)
    assert (job.status, job.done, job.failed) == ("completed", len(texts), 0)
    rows = await all_rows(pipeline, job_id)
    assert [row["index"] for row in rows] == list(range(len(texts)))
    for row, text in zip(rows, texts, strict=True):
        assert row["id"] == f"id-{row['index']}"
        assert row["embedding"] == pytest.approx(expected_vector(text, DIMS), abs=1e-6)
    entries = await pipeline.redis.xrange(KEYS.events(job_id))
    kinds = Counter(fields[b"type"] for _, fields in entries)
    chunk_size = pipeline.settings.chunk_size
    assert kinds == {b"result": -(-len(texts) // chunk_size), b"end": 1}


async def poll(check: Callable[[], Any], timeout_s: float = 10) -> Any:
    """Await `check()` until it returns something truthy, within a deadline."""
    with anyio.fail_after(timeout_s):
        while True:
            value = await check()
            if value:
                return value
            await anyio.sleep(0.02)


async def wait_entered(embedder: GateEmbedder) -> None:
    with anyio.fail_after(10):
        while not embedder.entered.is_set():
            await anyio.sleep(0.01)


async def create_groups(client: Any) -> None:
    for stream in (FAST, BULK):
        with contextlib.suppress(Exception):
            await client.xgroup_create(stream, GROUP, id="0", mkstream=True)


async def feed_events(client: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(fields[b"type"].decode(), orjson.loads(fields[b"data"]))
            for _, fields in await client.xrange(KEYS.feed)]


async def pending_count(client: Any, stream: str) -> int:
    return int((await client.xpending(stream, GROUP))["pending"])
