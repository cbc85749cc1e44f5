"""Real worker processes stopped by signals, and killed by the input they embed.

- SIGTERM mid-batch: the worker commits the batch in hand, acks, deregisters
  and exits 0; a second SIGTERM exits at once (130) and leaves its entries
  pending for a peer. Either way nothing is lost and nothing is duplicated.
- A text that segfaults the process: a supervisor loop here restarts the
  worker each time it dies, as systemd or Kubernetes would; the job ends with
  that text failed, with a reason, and every other text embedded.

Jobs are submitted and read through the in-process Pipeline (the server is
not what these tests are about); the workers use the fake embedders of
tests/support/fakes.py, so a process starts in a second or two.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from pipeline.inputs import Item, JobOptions
from pipeline.keys import GROUP, Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.store.embedded import EmbeddedRedis
from tests.support.fakes import CRASH, DELAY_ENV, expected_vector
from tests.support.processes import Process, start_worker

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

KEYS = Keys("es")
DIMS = 384
QUICK = {"EMBEDSTREAM_CHUNK_SIZE": "8", "EMBEDSTREAM_BATCH_MAX_TEXTS": "16",
         "EMBEDSTREAM_BLOCK_MS": "200", "EMBEDSTREAM_HEARTBEAT_INTERVAL_S": "0.3",
         "EMBEDSTREAM_HEARTBEAT_TTL_S": "2", "EMBEDSTREAM_VISIBILITY_TIMEOUT_S": "2",
         "EMBEDSTREAM_CALIBRATE": "0"}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis", binary="valkey") as server:
        yield server


@pytest.fixture
async def pipeline(redis_server: EmbeddedRedis, tmp_path: Path) -> AsyncIterator[Pipeline]:
    settings = Settings(redis_url=redis_server.url, data_dir=tmp_path, chunk_size=8)
    service = Pipeline(settings)
    try:
        yield service
    finally:
        await service.close()


def worker(redis_server: EmbeddedRedis, tmp_path: Path, name: str, backend: str,
           **env: str) -> Process:
    return start_worker(redis_server.url, tmp_path, name,
                        **{**QUICK, "EMBEDSTREAM_BACKEND": f"tests.support.fakes:{backend}", **env})


async def poll(check: Any, timeout_s: float, what: str) -> Any:
    """Await `check()` until truthy, within a deadline."""
    with anyio.fail_after(timeout_s):
        while not (value := await check()):
            await anyio.sleep(0.05)
        return value


async def registered(pipeline: Pipeline, process: Process) -> None:
    async def up() -> bool:
        assert process.alive(), process.log()[-3000:]
        return bool(await pipeline.redis.hlen(KEYS.workers))
    await poll(up, 60, "a worker")


async def submit(pipeline: Pipeline, texts: list[str]) -> str:
    job = await pipeline.submit([Item(t, f"id-{i}") for i, t in enumerate(texts)],
                                JobOptions())
    return job.id


async def done(pipeline: Pipeline, job_id: str) -> int:
    return (await pipeline.job(job_id)).done


async def finished(pipeline: Pipeline, job_id: str) -> dict[str, Any] | None:
    job = await pipeline.job(job_id)
    return job.public() if job.status in ("completed", "failed") else None


async def rows_of(pipeline: Pipeline, job_id: str) -> list[dict[str, Any]]:
    page = await pipeline.results(job_id, None, limit=1000)
    assert page.next_cursor is None
    return list(page.rows)


async def assert_exactly_once(pipeline: Pipeline, job_id: str, texts: list[str]) -> None:
    """Every index once with its own vector, one result event per chunk, nothing pending."""
    job = await pipeline.job(job_id)
    assert (job.status, job.done, job.failed) == ("completed", len(texts), 0)
    rows = await rows_of(pipeline, job_id)
    assert [row["index"] for row in rows] == list(range(len(texts)))
    for row, text in zip(rows, texts, strict=True):
        assert row["embedding"] == pytest.approx(expected_vector(text, DIMS), abs=1e-6)
    events = Counter(f[b"type"] for _, f in await pipeline.redis.xrange(KEYS.events(job_id)))
    assert events == {b"result": len(texts) // 8, b"end": 1}
    assert int(await pipeline.redis.get(KEYS.texts_counter)) == len(texts)
    for stream in KEYS.queues(DEFAULT_MODEL):
        assert int((await pipeline.redis.xpending(stream, GROUP))["pending"]) == 0


def texts_of(n: int) -> list[str]:
    return [f"signal test text number {i}" for i in range(n)]


async def test_sigterm_mid_batch_commits_the_batch_then_a_peer_finishes_the_job(
    redis_server: EmbeddedRedis, pipeline: Pipeline, tmp_path: Path
) -> None:
    texts = texts_of(64)  # eight chunks, two a model call of half a second
    first = worker(redis_server, tmp_path, "first", "SlowEmbedder", **{DELAY_ENV: "0.5"})
    second = None
    try:
        await registered(pipeline, first)
        job_id = await submit(pipeline, texts)
        # The texts counter moves after the acks, so then the first batch is through.
        await poll(lambda: pipeline.redis.get(KEYS.texts_counter), 30, "the first batch")
        await poll(lambda: claimed(pipeline), 30, "the next batch claimed")
        before = await done(pipeline, job_id)
        first.popen.send_signal(signal.SIGTERM)  # during the next model call
        with anyio.fail_after(15):
            while first.alive():
                await anyio.sleep(0.05)
        log = first.log()
        assert first.stop() == 0, log[-3000:]
        assert "draining" in log
        # The batch in hand was committed, and nothing claimed after it.
        assert 0 < await done(pipeline, job_id) - before <= 16
        assert not await pipeline.redis.hlen(KEYS.workers)  # it deregistered

        second = worker(redis_server, tmp_path, "second", "SlowEmbedder",
                        **{DELAY_ENV: "0.05"})
        await poll(lambda: finished(pipeline, job_id), 60, "the job's end")
        await assert_exactly_once(pipeline, job_id, texts)
    finally:
        for process in (first, second):
            if process is not None:
                process.stop()


async def test_a_second_sigterm_exits_at_once_and_a_peer_reclaims_the_batch(
    redis_server: EmbeddedRedis, pipeline: Pipeline, tmp_path: Path
) -> None:
    texts = texts_of(40)  # five chunks, in the bulk lane
    first = worker(redis_server, tmp_path, "first", "SlowEmbedder", **{DELAY_ENV: "30"})
    second = None
    try:
        await registered(pipeline, first)
        job_id = await submit(pipeline, texts)
        await poll(lambda: claimed(pipeline), 30, "a claimed batch")
        await poll(lambda: _running(pipeline, job_id), 30, "the job started")
        first.popen.send_signal(signal.SIGTERM)
        await poll(lambda: _logged(first, "draining"), 10, "the first signal handled")
        started = time.monotonic()
        first.popen.send_signal(signal.SIGTERM)
        assert first.stop(timeout_s=10) == 130
        assert time.monotonic() - started < 5  # not after the 30 s model call
        assert await claimed(pipeline)  # its entries were left pending, for others

        second = worker(redis_server, tmp_path, "second", "SlowEmbedder",
                        **{DELAY_ENV: "0.05"})
        await poll(lambda: finished(pipeline, job_id), 60, "the job's end")
        await assert_exactly_once(pipeline, job_id, texts)
    finally:
        for process in (first, second):
            if process is not None:
                process.stop()


async def claimed(pipeline: Pipeline) -> int:
    """Entries of the bulk lane claimed and not acked."""
    summary = await pipeline.redis.xpending(KEYS.queue(DEFAULT_MODEL, "bulk"), GROUP)
    return int(summary["pending"])


async def _running(pipeline: Pipeline, job_id: str) -> bool:
    return (await pipeline.job(job_id)).status == "running"


async def _logged(process: Process, text: str) -> bool:
    return text in process.log()
async def test_a_text_that_segfaults_the_worker_fails_alone(
    redis_server: EmbeddedRedis, pipeline: Pipeline, tmp_path: Path
) -> None:
    texts = texts_of(24)
    texts[13] = f"this one {CRASH}es the process"
    job_id = await submit(pipeline, texts)
    deaths: list[int] = []
    current = worker(redis_server, tmp_path, "w0", "CrashEmbedder")
    try:
        with anyio.fail_after(90):
            while not await finished(pipeline, job_id):
                if not current.alive():  # the supervisor: restart what died
                    deaths.append(current.stop())
                    current = worker(redis_server, tmp_path, f"w{len(deaths)}",
                                     "CrashEmbedder")
                await anyio.sleep(0.1)
    finally:
        current.stop()
    assert deaths and all(code == -signal.SIGSEGV for code in deaths)
    job = await pipeline.job(job_id)
    assert (job.status, job.done, job.failed) == ("completed", 23, 1)
    rows = await rows_of(pipeline, job_id)
    assert [row["index"] for row in rows] == list(range(24))
    for row, text in zip(rows, texts, strict=True):
        if row["index"] == 13:
            assert row["embedding"] is None
            assert "worker process died while embedding this input" in row["error"]
        else:
            assert row["embedding"] == pytest.approx(expected_vector(text, DIMS), abs=1e-6)
    events = Counter(f[b"type"] for _, f in await pipeline.redis.xrange(KEYS.events(job_id)))
    assert events == {b"result": 3, b"end": 1}
