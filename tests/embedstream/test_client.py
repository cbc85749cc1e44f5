"""The Python client: AsyncClient in-process, Client through real processes.

In-process tests run the app behind `httpx.ASGITransport` with an in-process
worker (fake embedder); the restart test kills the real server under a
running `job.results()` and starts another on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from embedstream import AsyncClient, Client, EmbedstreamError, ServerUnreachable
from mcp_server.app import create_app
from pipeline.settings import Settings
from pipeline.store.embedded import EmbeddedRedis
from tests.support.fakes import HashEmbedder, expected_vector
from tests.support.processes import (
    Process,
    free_port,
    start_worker,
    wait_for_http,
    wait_for_workers,
)
from workers.worker import run_worker

DIMS = 384


@pytest.fixture
def client_settings(settings: Settings) -> Settings:
    return settings.replace(block_ms=100, chunk_size=4, fast_lane_max_texts=4,
                            batch_max_texts=16, heartbeat_interval_s=0.2, heartbeat_ttl_s=2.0)


@contextlib.asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[AsyncClient]:
    """The app in-process with one in-process fake worker; an AsyncClient on it."""
    app = create_app(settings, with_mcp=False)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_worker(settings, HashEmbedder(settings), stop, ready))
    await asyncio.wait_for(ready.wait(), 10)
    try:
        async with app.router.lifespan_context(app):
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://127.0.0.1")
            async with AsyncClient("http://test", http=http) as client:
                yield client
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def expected(texts: list[str]) -> np.ndarray[Any, Any]:
    return np.vstack([expected_vector(text, DIMS) for text in texts])


@pytest.mark.anyio
async def test_embed_returns_one_float32_row_a_text_in_order(client_settings: Settings) -> None:
    texts = [f"text {i}" for i in range(10)]
    async with serving(client_settings) as client:
        vectors = await client.embed(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (10, DIMS)
    np.testing.assert_allclose(vectors, expected(texts), atol=1e-6)


@pytest.mark.anyio
async def test_a_generator_is_streamed_and_each_result_comes_once(
    client_settings: Settings
) -> None:
    def inputs() -> Any:
        for i in range(23):
            yield {"id": f"doc-{i}", "text": f"streamed {i}"} if i % 2 else f"streamed {i}"

    async with serving(client_settings) as client:
        job = await client.submit(inputs(), dimensions=64)
        assert job.total == 23
        results = [r async for r in job.results()]
        status = await job.wait(timeout_s=10)
        again = await client.job(job.id)
        replay = [r.index async for r in again.results()]
    assert sorted(r.index for r in results) == list(range(23))
    assert sorted(replay) == list(range(23))
    assert status["status"] == "completed" and status["done"] == 23
    by_index = {r.index: r for r in results}
    assert by_index[3].id == "doc-3" and by_index[2].id is None
    np.testing.assert_allclose(by_index[5].embedding,
                               expected_vector("streamed 5", DIMS, output_dimensions=64),
                               atol=1e-6)


@pytest.mark.anyio
async def test_errors_carry_the_servers_status_and_code(client_settings: Settings) -> None:
    async with serving(client_settings) as client:
        with pytest.raises(EmbedstreamError) as bad:
            await client.submit(["ok", "   "])
        with pytest.raises(EmbedstreamError) as missing:
            await client.job("0" * 32)
    assert bad.value.status == 422 and bad.value.code == "invalid_input"
    assert "inputs[1]" in bad.value.message
    assert missing.value.status == 404



@pytest.mark.anyio
async def test_a_streamed_files_blank_lines_are_skipped_but_a_lists_blank_text_is_refused(
    client_settings: Settings, tmp_path: Path
) -> None:
    source = tmp_path / "lines.txt"
    source.write_text("first line\n\n   \nsecond line\n")
    async with serving(client_settings) as client:
        with source.open() as handle:
            job = await client.submit(line.strip() for line in handle)
        results = sorted([r async for r in job.results()], key=lambda r: r.index)
        with pytest.raises(EmbedstreamError) as blank:
            await client.embed(["a text", ""])
    assert job.total == 2, "a blank line is not an input"
    np.testing.assert_allclose(np.vstack([r.embedding for r in results]),
                               expected(["first line", "second line"]), atol=1e-6)
    assert blank.value.status == 422 and "inputs[1]" in blank.value.message

def test_an_unreachable_server_is_server_unreachable() -> None:
    with Client("http://127.0.0.1:9", reconnect_for_s=0.2) as client, \
            pytest.raises(ServerUnreachable, match="cannot reach embedstream"):
        client.embed(["nobody listens"])


def start_server_on(redis_url: str, log_dir: Path, port: int, tag: str) -> Process:
    process = Process(["serve", "--port", str(port), "--log-level", "warning"],
                      log_dir / f"serve-{tag}.log", {"EMBEDSTREAM_REDIS_URL": redis_url})
    wait_for_http(process, f"http://127.0.0.1:{port}/healthz", 60)
    return process


@pytest.mark.slow
def test_results_survive_a_server_restart_mid_job(tmp_path: Path) -> None:
    texts = [f"restart text {i}" for i in range(1000)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with EmbeddedRedis(tmp_path / "redis", binary="valkey") as redis_server:
        worker = start_worker(redis_server.url, tmp_path, "slow",
                              EMBEDSTREAM_BACKEND="tests.support.fakes:SlowEmbedder",
                              EMBEDSTREAM_CALIBRATE="0",
                              EMBEDSTREAM_FAKE_DELAY_S="0.2", EMBEDSTREAM_BATCH_MAX_TEXTS="32")
        servers = [start_server_on(redis_server.url, tmp_path, port, "first")]
        try:
            wait_for_workers(base, 1)
            with Client(base) as client:
                job = client.submit(texts)
                seen: list[int] = []
                at_kill = None
                vectors: dict[int, Any] = {}
                for result in job.results():
                    seen.append(result.index)
                    vectors[result.index] = result.embedding
                    if len(seen) == 300:
                        at_kill = job.status()["status"]
                        servers[0].kill()
                        servers.append(start_server_on(redis_server.url, tmp_path, port,
                                                       "second"))
                status = job.status()
        finally:
            for process in (*servers, worker):
                process.stop()
    assert len(servers) == 2 and at_kill == "running", "the job ended before the restart"
    assert len(seen) == len(set(seen)) == len(texts), "a result was lost or repeated"
    assert status["status"] == "completed"
    np.testing.assert_allclose(np.vstack([vectors[i] for i in range(len(texts))]),
                               expected(texts), atol=1e-6)
