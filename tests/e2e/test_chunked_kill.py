"""kill -9 of a real worker process in the middle of a job of long (chunked) and short texts."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from pipeline.inputs import Item, JobOptions
from pipeline.keys import Keys
from pipeline.model.embedder import shape_vectors
from pipeline.model.info import DEFAULT_MODEL
from pipeline.model.tokens import tokenizer
from pipeline.model.windows import split_windows
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.store.embedded import EmbeddedRedis
from tests.support.fakes import DELAY_ENV, raw_vector
from tests.support.processes import start_worker

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

KEYS = Keys("es")
DIMS = 384
QUICK = {"EMBEDSTREAM_CHUNK_SIZE": "4", "EMBEDSTREAM_BATCH_MAX_TEXTS": "8",
         "EMBEDSTREAM_BLOCK_MS": "200", "EMBEDSTREAM_HEARTBEAT_INTERVAL_S": "0.3",
         "EMBEDSTREAM_HEARTBEAT_TTL_S": "2", "EMBEDSTREAM_VISIBILITY_TIMEOUT_S": "2",
         "EMBEDSTREAM_CALIBRATE": "0", "EMBEDSTREAM_BACKEND": "tests.support.fakes:SlowEmbedder",
         DELAY_ENV: "0.4"}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis", binary="valkey") as server:
        yield server


def pooled(text: str) -> tuple[np.ndarray, int]:
    """(the vector the fake's windows of `text` pool to, normalized; how many windows)."""
    offsets = tokenizer(DEFAULT_MODEL).encode(text, add_special_tokens=False).offsets
    windows = split_windows(text, offsets, 254, 32)
    weights = np.array([n for _, n in windows], dtype=np.float64)
    mean = sum(w * raw_vector(t, DIMS).astype(np.float64)
               for (t, _), w in zip(windows, weights, strict=True)) / weights.sum()
    return shape_vectors(mean.astype(np.float32)[None, :], None, True)[0], len(windows)


async def test_every_input_of_a_chunked_job_is_committed_once_after_kill_9(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    long = " ".join(f"token{i}" for i in range(400))
    texts = [f"{long} {i}" if i % 2 == 0 else f"short text {i}" for i in range(24)]
    service = Pipeline(Settings(redis_url=redis_server.url, data_dir=tmp_path, chunk_size=4))
    doomed = start_worker(redis_server.url, tmp_path, "doomed", **QUICK)
    survivor = None
    try:
        with anyio.fail_after(60):
            while not await service.redis.hlen(KEYS.workers):
                assert doomed.alive(), doomed.log()[-3000:]
                await anyio.sleep(0.05)
        job = await service.submit([Item(t) for t in texts], JobOptions(chunk=True))
        with anyio.fail_after(30):
            while int((await service.job(job.id)).done) == 0:
                await anyio.sleep(0.02)
        doomed.kill()
        assert (await service.job(job.id)).status == "running"
        survivor = start_worker(redis_server.url, tmp_path, "survivor", **QUICK)
        with anyio.fail_after(90):
            while (await service.job(job.id)).status == "running":
                await anyio.sleep(0.1)
        final = await service.job(job.id)
        assert (final.status, final.done, final.failed) == ("completed", 24, 0)
        rows = (await service.results(job.id, None, limit=100)).rows
        assert [row["index"] for row in rows] == list(range(24))
        for row, text in zip(rows, texts, strict=True):
            expected, windows = pooled(text)
            assert row["chunks"] == windows and windows == (5 if row["index"] % 2 == 0 else 1)
            assert row["embedding"] == pytest.approx(expected.tolist(), abs=1e-6)
        kinds = Counter(f[b"type"] for _, f in await service.redis.xrange(KEYS.events(job.id)))
        assert kinds == {b"result": 6, b"end": 1}
    finally:
        for process in (survivor, doomed):
            if process is not None:
                process.stop()
        await service.close()
