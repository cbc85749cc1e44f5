"""Quantized delivery: the same integers as sentence-transformers' quantize_embeddings."""

import dataclasses
from typing import Any

import numpy as np
import pytest
from sentence_transformers.util import quantize_embeddings

from pipeline.errors import InvalidRequest, Unavailable
from pipeline.jobs.quantize import (
    ENCODINGS,
    Views,
    calibration_texts,
    check_encoding,
    load_calibration,
    quantize,
    ranges_from,
    store_calibration,
)
from pipeline.jobs.record import JobRecord, JobStatus
from pipeline.keys import Keys
from pipeline.model.embedder import shape_vectors
from pipeline.settings import Settings
from pipeline.store.connections import connect

KEYS = Keys("es")
RNG = np.random.default_rng(7)


def vectors(n: int, dims: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    return RNG.standard_normal((n, dims)).astype(np.float32)


@pytest.mark.parametrize("encoding", ["int8", "uint8"])
def test_scaled_integers_equal_quantize_embeddings_with_the_same_ranges(encoding: str) -> None:
    calibration, data = vectors(200, 24), vectors(50, 24) * 1.3  # some values out of range
    ranges = ranges_from(calibration, None, False)
    expected = quantize_embeddings(data, encoding, ranges=ranges)
    got = quantize(data, encoding, ranges)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


@pytest.mark.parametrize("encoding", ["binary", "ubinary"])
def test_sign_bits_equal_quantize_embeddings(encoding: str) -> None:
    data = vectors(30, 20)  # 20 dims: the last byte is padded, as numpy packbits does
    expected = quantize_embeddings(data, encoding)
    got = quantize(data, encoding)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert got.shape == (30, 3)


def test_ranges_follow_the_jobs_shape() -> None:
    calibration = vectors(100, 16)
    shaped = shape_vectors(calibration, 8, True)
    ranges = ranges_from(calibration, 8, True)
    assert ranges.shape == (2, 8)
    assert np.array_equal(ranges[0], shaped.min(axis=0))
    assert np.array_equal(ranges[1], shaped.max(axis=0))


def test_encodings_are_checked_by_name() -> None:
    assert check_encoding(None) == "float"
    assert all(check_encoding(name) == name for name in ENCODINGS)
    with pytest.raises(InvalidRequest, match="int8"):
        check_encoding("int4")


def test_the_calibration_corpus_is_fixed_and_not_the_dev_split() -> None:
    texts = calibration_texts()
    assert len(texts) == 1000 and len(set(texts)) == 1000
    assert texts[0] == "a plane is taking off ."


@pytest.mark.anyio
async def test_the_first_recorded_calibration_wins(settings: Settings) -> None:
    assert settings.redis_url
    redis = connect(settings.redis_url)
    try:
        first, second = vectors(10, 4), vectors(10, 4)
        assert await store_calibration(redis, KEYS, "m", first)
        assert not await store_calibration(redis, KEYS, "m", second)
        assert np.array_equal(await load_calibration(redis, KEYS, "m", 4), first)
        views = Views(redis, KEYS)
        record = JobRecord(id="a" * 32, status=JobStatus.QUEUED, total=1, model="m",
                           dimensions=4, model_dimensions=4, normalize=False, truncate=True,
                           chunk_size=32, chunks=1, lane="fast", created_at="", created_ts=0.0)
        view = await views.for_job("int8", record)
        assert view.ranges is not None
        assert np.array_equal(view.ranges, ranges_from(first, None, False))
        with pytest.raises(Unavailable, match="no int8/uint8 ranges"):
            await views.for_job("uint8", dataclasses.replace(record, model="other"))
    finally:
        await redis.aclose()


@pytest.mark.anyio
async def test_only_the_worker_holding_the_lock_records_the_calibration(
    settings: Settings,
) -> None:
    from tests.support.fakes import HashEmbedder
    from workers.calibration import ensure_calibration

    assert settings.redis_url
    redis = connect(settings.redis_url)
    try:
        embedder = HashEmbedder(settings)
        await redis.set(KEYS.calibration_lock(embedder.info.name), b"1")
        await ensure_calibration(redis, KEYS, embedder)
        assert embedder.calls == [] and not await redis.exists(
            KEYS.calibration(embedder.info.name))
        await redis.delete(KEYS.calibration_lock(embedder.info.name))
        await ensure_calibration(redis, KEYS, embedder)
        assert len(embedder.calls) == 1 and len(embedder.calls[0]) == 1000
        assert not await redis.exists(KEYS.calibration_lock(embedder.info.name))
        await ensure_calibration(redis, KEYS, embedder)  # recorded: nothing more to do
        assert len(embedder.calls) == 1
    finally:
        await redis.aclose()
