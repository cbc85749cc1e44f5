"""Model calls: deduplicated, cached, cut by tokens, and the fast lane served between them."""

import asyncio
import dataclasses
import threading
from collections.abc import Sequence

import anyio
import numpy as np
import pytest

from pipeline.keys import Keys
from pipeline.model.embedder import Embedded
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.store.metrics import read_metrics
from tests.support.fakes import HashEmbedder, expected_vector, raw_vector
from tests.support.workers import all_rows, create_groups, running, submit, wait_end
from workers.cache import Cached, EmbeddingCache, fingerprint
from workers.model_calls import ModelCalls
from workers.work import Entry, Work
from workers.worker import Worker

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
DIMS = 384


class CachingEmbedder(HashEmbedder):
    """A fake that names its model revision, as real backends do, so the cache is used."""

    revision = "fake-revision-1"


class StallingEmbedder(CachingEmbedder):
    """Holds the first call of bulk texts until the test lets it go."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.first_call = threading.Event()
        self.release = threading.Event()

    def before_embed(self, texts: Sequence[str]) -> None:
        if any(t.startswith("bulk") for t in texts) and not self.first_call.is_set():
            self.first_call.set()
            self.release.wait(20)


@pytest.fixture
def fast_settings(fast_settings: Settings) -> Settings:
    """The shared fast settings, with model calls of 4 texts in batches of 16."""
    return fast_settings.replace(call_max_texts=4, batch_max_texts=16)


class SizeRecorder(HashEmbedder):
    """Records how many texts each model call held."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.sizes: list[int] = []

    def embed(self, texts: Sequence[str]) -> Embedded:
        self.sizes.append(len(texts))
        return super().embed(texts)


def work_of(texts: list[str], chunk: int = 0) -> Work:
    return Work(Entry("s", b"1-0", "j" * 32, chunk, len(texts)), texts, [None] * len(texts),
                normalize=True, dimensions=None)


async def test_duplicate_texts_in_one_batch_are_embedded_once(settings: Settings) -> None:
    embedder = HashEmbedder(settings)
    calls = ModelCalls(embedder, None, max_texts=32, max_tokens=4096)
    work = [work_of(["a", "b", "a"]), work_of(["b", "c"], chunk=1)]
    await calls.embed(work)
    assert sorted(embedder.embedded_texts) == ["a", "b", "c"]
    assert work[0].vectors is not None and work[1].vectors is not None
    assert np.array_equal(work[0].vectors[0], work[0].vectors[2])
    assert np.array_equal(work[1].vectors[0], raw_vector("b", DIMS))


async def test_calls_are_cut_by_padded_tokens_so_one_long_text_pads_no_short_one(
    settings: Settings
) -> None:
    calls = ModelCalls(HashEmbedder(settings), None, max_texts=32, max_tokens=200)
    long_text = "word " * 150
    groups = calls.calls(["short one", long_text, "short two", "short three"])
    assert groups[-1] == [long_text]
    assert all(long_text not in group for group in groups[:-1])
    assert len(groups[0]) == 3


async def test_while_interactive_work_comes_in_bulk_calls_are_cut_to_a_quarter(
    settings: Settings
) -> None:
    served = asyncio.Event()

    async def between_calls() -> None:
        served.set()  # as if the worker had served a request between two calls

    embedder = SizeRecorder(settings)
    calls = ModelCalls(embedder, None, max_texts=8, max_tokens=4096, busy=served.is_set)
    await calls.embed([work_of([f"bulk text {i}" for i in range(20)])], between_calls)
    assert embedder.sizes == [8, 2, 2, 2, 2, 2, 2]  # the first call was cut in a quiet spell


@pytest.mark.parametrize("busy", [True, False], ids=["busy", "quiet"])
async def test_the_fast_lane_own_calls_are_half_the_budgets_busy_or_not(
    settings: Settings, busy: bool
) -> None:
    embedder = SizeRecorder(settings)
    calls = ModelCalls(embedder, None, max_texts=8, max_tokens=4096, busy=lambda: busy)
    # No `between_calls`: the worker embeds requests, which nothing interrupts; their
    # calls are cut for padding (REQUEST_CUT), never to a quarter (BUSY_CUT).
    await calls.embed([work_of([f"query {i}" for i in range(20)])])
    assert embedder.sizes == [4, 4, 4, 4, 4]


def held_cache(pipeline: Pipeline) -> tuple[EmbeddingCache, asyncio.Event, list[str]]:
    """A cache whose stores wait for the gate; the texts stored, in order, once landed."""
    cache = EmbeddingCache(pipeline.redis, Keys("es"), fingerprint(DEFAULT_MODEL, "r", "b"),
                           ttl_s=60, max_entries=100)
    gate = asyncio.Event()
    landed: list[str] = []
    real_store = cache.store_scoped

    async def held_store(entries: dict[tuple[str, str], Cached]) -> None:
        await gate.wait()
        await real_store(entries)
        landed.extend(text for _, text in entries)

    cache.store_scoped = held_store  # type: ignore[method-assign]
    return cache, gate, landed


async def test_the_cache_is_written_behind_the_model_and_read_after_the_write(
    settings: Settings, pipeline: Pipeline
) -> None:
    cache, gate, _ = held_cache(pipeline)  # as if Redis were slow to take the writes
    embedder = HashEmbedder(settings)
    calls = ModelCalls(embedder, cache, max_texts=32, max_tokens=4096)
    texts = [f"cached behind {i}" for i in range(5)]
    with anyio.fail_after(5):
        await calls.embed([work_of(texts)])  # returns with its store still held
    assert await cache.lookup(texts) == {}
    second = asyncio.create_task(calls.embed([work_of(texts)]))
    await asyncio.sleep(0.1)
    assert not second.done()  # its lookup waits for the store before it
    gate.set()
    with anyio.fail_after(5):
        await second
    assert set(await cache.lookup(texts)) == set(texts)
    assert len(embedder.calls) == 1  # the second batch came from the cache


async def test_a_batch_looked_up_ahead_of_the_last_store_takes_its_texts_from_memory(
    settings: Settings, pipeline: Pipeline
) -> None:
    cache, gate, _ = held_cache(pipeline)  # not landed when the next batch is looked up
    embedder = HashEmbedder(settings)
    calls = ModelCalls(embedder, cache, max_texts=32, max_tokens=4096)
    texts = [f"read ahead {i}" for i in range(5)]
    following = work_of([*texts[:3], "a new text"])
    found = await calls.look_up([following])  # as the read-ahead asks, during batch 1
    assert found == {}
    with anyio.fail_after(5):
        await calls.embed([work_of(texts)])  # batch 1; its store is held
        assert await cache.lookup(texts) == {}
        await calls.embed([following], found=found)  # batch 2: no wait for the store
    # Batch 2's three repeated texts came from the held store's entries, not the model.
    assert embedder.calls == [sorted(texts, key=len), ["a new text"]]
    dims = embedder.info.dimensions
    assert following.vectors is not None
    assert np.allclose(following.vectors[:3], [raw_vector(t, dims) for t in texts[:3]])
    gate.set()
    with anyio.fail_after(5):
        await calls.stored()
    counters, _ = await read_metrics(pipeline.redis, Keys("es"))
    # Batch 1 missed 5, the test's own lookup 5; batch 2 counted its 3 texts taken from
    # memory as hits (its lookup ahead had missed them) and only the new text as a miss.
    assert (counters["cache_hits"], counters["cache_misses"]) == (3, 5 + 5 + 1)
    assert set(await cache.lookup([*texts, "a new text"])) == {*texts, "a new text"}


async def test_at_most_two_cache_stores_are_in_flight_and_they_land_in_order(
    settings: Settings, pipeline: Pipeline
) -> None:
    cache, gate, landed = held_cache(pipeline)
    calls = ModelCalls(HashEmbedder(settings), cache, max_texts=32, max_tokens=4096)
    with anyio.fail_after(5):
        for batch in range(2):  # two stores held: the embeds return regardless
            await calls.embed([work_of([f"batch {batch}"])], found={})
    third = asyncio.create_task(calls.embed([work_of(["batch 2"])], found={}))
    await asyncio.sleep(0.1)
    assert not third.done()  # at the bound: it waits for the oldest store
    gate.set()
    with anyio.fail_after(5):
        await third
        await calls.stored()
    assert landed == ["batch 0", "batch 1", "batch 2"]


async def test_resubmitted_texts_come_from_the_cache_with_the_same_vectors(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    texts = [f"cached text {i}" for i in range(10)]
    embedder = CachingEmbedder(fast_settings)
    async with running(fast_settings, embedder):
        first = await submit(pipeline, texts)
        await wait_end(pipeline, first)
        calls_after_first = len(embedder.calls)
        second = await submit(pipeline, texts, dimensions=64, normalize=False)
        await wait_end(pipeline, second)
    assert len(embedder.calls) == calls_after_first  # the model was not called again
    rows = await all_rows(pipeline, second)
    for row, text in zip(rows, texts, strict=True):
        assert row["embedding"] == pytest.approx(
            expected_vector(text, DIMS, output_dimensions=64), abs=1e-6)
    counters, _ = await read_metrics(pipeline.redis, KEYS)
    assert (counters["cache_hits"], counters["cache_misses"]) == (10, 10)


async def test_with_the_cache_off_every_job_is_embedded(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    settings = fast_settings.replace(cache=False)
    embedder = CachingEmbedder(settings)
    async with running(settings, embedder):
        for _ in range(2):
            await wait_end(pipeline, await submit(pipeline, ["same text"]))
    assert embedder.embedded_texts == ["same text", "same text"]
    counters, _ = await read_metrics(pipeline.redis, KEYS)
    assert "cache_hits" not in counters


async def test_the_cache_cap_evicts_only_cache_entries(
    settings: Settings, pipeline: Pipeline
) -> None:
    job_id = await submit(pipeline, ["a job's text"])
    cache = EmbeddingCache(pipeline.redis, KEYS, fingerprint(DEFAULT_MODEL, "r", "b"),
                           ttl_s=60, max_entries=10)
    for batch in range(3):
        await cache.store({f"t{batch}-{i}": Cached(raw_vector(f"{i}", 8), 3) for i in range(8)})
    entries = [k async for k in pipeline.redis.scan_iter(match="es:cache:*:*")]
    assert len(entries) == 10
    assert await pipeline.redis.zcard(KEYS.cache_index) == 10
    assert await pipeline.redis.exists(KEYS.job(job_id), KEYS.inputs(job_id),
                                       KEYS.queue(DEFAULT_MODEL, "fast")) == 3
    found = await cache.lookup(["t2-7", "t0-0"])
    assert list(found) == ["t2-7"]  # the oldest went first
    assert found["t2-7"].tokens == 3
    assert 0 < await pipeline.redis.ttl(cache.key("t2-7")) <= 60


async def test_the_fast_lane_is_served_between_the_model_calls_of_a_bulk_batch(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    embedder = StallingEmbedder(fast_settings)
    bulk_texts = [f"bulk text {i}" for i in range(16)]
    async with running(fast_settings, embedder):
        bulk = await submit(pipeline, bulk_texts)
        await wait_first_call(embedder)
        fast = await submit(pipeline, ["an interactive query"])
        embedder.release.set()
        await wait_end(pipeline, fast)
        await wait_end(pipeline, bulk)
    order = [call[0] for call in embedder.calls]
    position = order.index("an interactive query")
    assert position == 1  # right after the call that was running when it arrived
    # 16 bulk texts in calls of 4 until the query came, then of 1 (it may be followed).
    assert [len(call) for call in embedder.calls] == [4, 1] + [1] * 12


async def test_a_worker_claims_fast_lane_entries_only_until_they_fill_one_call(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    await create_groups(pipeline.redis)
    for n in range(6):
        await submit(pipeline, [f"query {n} text {i}" for i in range(3)])
    worker = Worker(fast_settings.replace(call_max_texts=4), HashEmbedder(fast_settings), "w",
                    pipeline.redis, pipeline.redis)
    entries = await worker.claims.claim_fast()
    assert [e.size for e in entries] == [3, 3]  # four peers may take the other four


async def wait_first_call(embedder: StallingEmbedder) -> None:
    with anyio.fail_after(10):
        while not embedder.first_call.is_set():
            await anyio.sleep(0.01)



@pytest.mark.parametrize("backend", ["torch", "onnx", "onnx-int8", "openvino-bf16"])
async def test_every_backend_calls_the_model_in_the_configured_sizes(
    fast_settings: Settings, pipeline: Pipeline, backend: str
) -> None:
    fake = HashEmbedder(fast_settings)
    fake.info = dataclasses.replace(fake.info, backend=backend)
    calls = Worker(fast_settings, fake, "w", pipeline.redis, pipeline.redis).calls
    assert (calls.max_texts, calls.max_tokens) == (
        fast_settings.call_max_texts, fast_settings.call_max_tokens)
