"""A chunked job survives a worker killed mid-job: every input's vector is committed once."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from pipeline.model.embedder import shape_vectors
from pipeline.model.info import DEFAULT_MODEL
from pipeline.model.tokens import tokenizer
from pipeline.model.windows import split_windows
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import GateEmbedder, HashEmbedder, raw_vector
from tests.support.workers import (
    KEYS,
    all_rows,
    pending_count,
    running,
    submit,
    wait_end,
    wait_entered,
)

pytestmark = pytest.mark.anyio
DIMS = 384


def expected(text: str) -> np.ndarray:
    """The pooled, normalized vector HashEmbedder's windows give a (long) text."""
    offsets = tokenizer(DEFAULT_MODEL).encode(text, add_special_tokens=False).offsets
    windows = split_windows(text, offsets, 254, 32)
    weights = np.array([n for _, n in windows], dtype=np.float64)
    mean = sum(w * raw_vector(t, DIMS).astype(np.float64)
               for (t, _), w in zip(windows, weights, strict=True)) / weights.sum()
    return shape_vectors(mean.astype(np.float32)[None, :], None, True)[0]


async def test_a_job_of_long_and_short_texts_survives_a_worker_killed_mid_job(
    fast_settings: Settings, pipeline: Pipeline, janitor_often: None
) -> None:
    long = " ".join(f"word{i}" for i in range(300))  # about 900 tokens: 4 windows
    texts = [f"{long} {i}" if i % 3 == 0 else f"short text {i}" for i in range(16)]
    doomed_embedder = GateEmbedder(fast_settings)
    survivor_embedder = HashEmbedder(fast_settings)
    try:
        async with running(fast_settings, doomed_embedder) as doomed:
            job_id = await submit(pipeline, texts, chunk=True)
            await wait_entered(doomed_embedder)
            await doomed.kill()
        # Model calls go shortest first (workers.model_calls), so the call in hand
        # holds short texts; the long texts' windows are claimed, not yet made.
        assert doomed_embedder.calls[0]
        assert await pending_count(pipeline.redis, KEYS.queues(DEFAULT_MODEL)[1]) > 0
        async with running(fast_settings, survivor_embedder):
            end = await wait_end(pipeline, job_id, timeout_s=30)
    finally:
        doomed_embedder.open()
    assert (end["status"], end["done"], end["failed"]) == ("completed", len(texts), 0)
    rows = await all_rows(pipeline, job_id)
    assert [row["index"] for row in rows] == list(range(len(texts)))
    for row, text in zip(rows, texts, strict=True):
        assert row["chunks"] == (4 if row["index"] % 3 == 0 else 1)
        assert row["embedding"] == pytest.approx(expected(text).tolist(), abs=1e-6)
    entries = await pipeline.redis.xrange(KEYS.events(job_id))
    kinds = Counter(fields[b"type"] for _, fields in entries)
    assert kinds == {b"result": len(texts) // fast_settings.chunk_size, b"end": 1}
