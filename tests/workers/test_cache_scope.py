"""The embedding cache's scope: under "tenant" one tenant's entry never answers another's text."""

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.inputs import Item, JobOptions
from pipeline.jobs.tenants import Caller
from pipeline.keys import Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.store.metrics import read_metrics
from tests.support.fakes import HashEmbedder, expected_vector, raw_vector
from tests.support.workers import all_rows, running, wait_end
from workers.cache import Cached, EmbeddingCache, cache_scope, fingerprint
from workers.model_calls import ModelCalls
from workers.work import Entry, Work
from workers.worker import Worker

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
DIMS = 384
SECRET = "tenant a's private sentence"
A, B = Caller("tenant-a"), Caller("tenant-b")


class CachingEmbedder(HashEmbedder):
    """A fake that names its model revision, as real backends do, so the cache is used."""

    revision = "fake-revision-1"


async def hits(pipeline: Pipeline) -> tuple[int, int]:
    counters, _ = await read_metrics(pipeline.redis, KEYS)
    return counters.get("cache_hits", 0), counters.get("cache_misses", 0)


async def embed_job(pipeline: Pipeline, caller: Caller, text: str) -> list[float]:
    """Submit `text` as `caller`'s job, wait for its end, and return its vector."""
    job = await pipeline.submit([Item(text)], JobOptions(), caller=caller)
    assert (await wait_end(pipeline, job.id))["status"] == "completed"
    return list((await all_rows(pipeline, job.id))[0]["embedding"])


@pytest.mark.parametrize(("scope", "b_hits"), [("tenant", 0), ("global", 1)])
async def test_another_tenants_cached_text_is_a_miss_under_the_tenant_scope(
    fast_settings: Settings, pipeline: Pipeline, scope: str, b_hits: int
) -> None:
    settings = fast_settings.replace(cache_scope=scope)
    embedder = CachingEmbedder(settings)
    async with running(settings, embedder):
        await embed_job(pipeline, A, SECRET)
        assert await hits(pipeline) == (0, 1)
        vector = await embed_job(pipeline, B, SECRET)
        assert await hits(pipeline) == (b_hits, 2 - b_hits)
        assert embedder.embedded_texts.count(SECRET) == 2 - b_hits  # B's guess cost a call
        assert vector == pytest.approx(expected_vector(SECRET, DIMS), abs=1e-6)
        await embed_job(pipeline, A, SECRET)  # the same tenant hits, in either scope
        assert (await hits(pipeline))[0] == b_hits + 1


async def test_an_interactive_request_is_cached_under_its_callers_scope(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    settings = fast_settings.replace(cache_scope="tenant")
    embedder = CachingEmbedder(settings)
    async with running(settings, embedder):
        await embed_job(pipeline, A, SECRET)
        other = await pipeline.embed([Item(SECRET)], JobOptions(), caller=B)
        assert await hits(pipeline) == (0, 2)
        assert list(other.rows[0]["embedding"]) == pytest.approx(
            expected_vector(SECRET, DIMS), abs=1e-6)
        await pipeline.embed([Item(SECRET)], JobOptions(), caller=A)
        assert await hits(pipeline) == (1, 2)


async def test_one_batch_of_two_tenants_embeds_a_text_once_when_either_missed(
    settings: Settings, pipeline: Pipeline
) -> None:
    embedder = CachingEmbedder(settings)
    cache = EmbeddingCache(pipeline.redis, KEYS, fingerprint(DEFAULT_MODEL, "r", "b"),
                           ttl_s=60, max_entries=100, scope="tenant")
    await cache.store({SECRET: Cached(raw_vector(SECRET, DIMS), 5)}, owner=A.owner)
    calls = ModelCalls(embedder, cache, max_texts=32, max_tokens=4096)
    work = [Work(Entry("s", b"1-0", "j" * 32, 0, 1), [SECRET], [None], normalize=False,
                 dimensions=None, owner=owner) for owner in (A.owner, B.owner)]
    await calls.embed(work)
    assert embedder.embedded_texts == [SECRET]  # B missed: the text is embedded, once
    for item in work:
        assert item.vectors is not None
        assert np.allclose(item.vectors[0], raw_vector(SECRET, DIMS))
    assert await hits(pipeline) == (1, 1)
    await calls.stored()  # the store runs behind the model, off its path
    assert set(await cache.lookup([SECRET], owner=B.owner)) == {SECRET}  # B's entry now


async def test_both_scopes_share_the_one_index_and_its_cap(
    settings: Settings, pipeline: Pipeline
) -> None:
    caches = [EmbeddingCache(pipeline.redis, KEYS, fingerprint(DEFAULT_MODEL, "r", "b"),
                             ttl_s=60, max_entries=10, scope=scope)
              for scope in ("tenant", "global")]
    for n, cache in enumerate(caches * 3):
        await cache.store({f"t{n}-{i}": Cached(raw_vector(f"{i}", 8), 3) for i in range(4)},
                          owner=f"owner-{n}")
    assert await pipeline.redis.zcard(KEYS.cache_index) == 10
    assert len([k async for k in pipeline.redis.scan_iter(match="es:cache:*:*")]) == 10
    assert caches[0].key("x", "a") != caches[0].key("x", "b")
    assert caches[0].key("x", "") != caches[1].key("x", "")  # the scopes never share a key
    assert caches[1].key("x", "a") == caches[1].key("x", "b")


@pytest.mark.parametrize(("settings_changes", "scope"), [
    ({"cache_scope": "auto"}, "global"),
    ({"cache_scope": "auto", "api_keys": ("k",)}, "tenant"),
    ({"cache_scope": "auto", "admin_keys": ("k",)}, "tenant"),
    ({"cache_scope": "Global", "api_keys": ("k",)}, "global"),
    ({"cache_scope": "tenant"}, "tenant"),
])
def test_auto_scope_is_tenant_exactly_when_keys_are_set(
    settings_changes: dict[str, object], scope: str
) -> None:
    assert cache_scope(Settings(**settings_changes)) == scope  # type: ignore[arg-type]


async def test_an_unknown_scope_stops_the_worker_at_start_naming_the_variable(
    settings: Settings, pipeline: Pipeline
) -> None:
    wrong = settings.replace(cache_scope="per-tenant")
    with pytest.raises(PipelineError, match=r"EMBEDSTREAM_CACHE_SCOPE.*per-tenant"):
        Worker(wrong, CachingEmbedder(wrong), "w", pipeline.redis, pipeline.redis)
