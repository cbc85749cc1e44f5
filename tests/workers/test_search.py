"""search_job's scan: the job's vectors page by page, the best top_k kept, failed inputs out."""

import itertools
from typing import Any

import numpy as np
import pytest

from pipeline.jobs import search
from pipeline.jobs.record import load_job
from pipeline.keys import Keys
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import POISON, PoisonEmbedder, expected_vector
from tests.support.timings import quick
from tests.support.workers import running, submit, wait_end

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
DIMS = 384


def brute_force(texts: list[str], query: np.ndarray[Any, Any], top_k: int,
                skip: set[int]) -> list[int]:
    """The expected ranking: every vector scored at once, ties by index."""
    scored = []
    for index, text in enumerate(texts):
        if index in skip:
            continue
        vector = expected_vector(text, DIMS)
        scored.append((-float(vector @ query) / float(np.linalg.norm(query)), index))
    return [index for _, index in sorted(scored)[:top_k]]


@pytest.mark.parametrize("page_chunks", [1, 3, 64])
async def test_the_paged_scan_finds_the_same_top_k_as_scoring_everything_at_once(
    settings: Settings, page_chunks: int
) -> None:
    fast = quick(settings)
    texts = [f"sentence number {i}" for i in range(90)]
    texts[7] = f"{POISON} seven"  # a failed input is never a match
    pipeline = Pipeline(fast)
    try:
        async with running(fast, PoisonEmbedder(fast)):
            job_id = await submit(pipeline, texts)
            end = await wait_end(pipeline, job_id)
        assert end["failed"] == 1
        record = await load_job(pipeline.redis, KEYS, job_id)
        assert record.chunks > 3 * page_chunks or page_chunks == 64
        query = expected_vector("sentence number 41", DIMS)
        hits = await search.nearest(pipeline.redis, KEYS, record, query, 10,
                                     page_chunks=page_chunks)
    finally:
        await pipeline.close()
    assert [index for index, _ in hits] == brute_force(texts, query, 10, skip={7})
    assert hits[0][0] == 41 and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert all(a[1] >= b[1] for a, b in itertools.pairwise(hits))
