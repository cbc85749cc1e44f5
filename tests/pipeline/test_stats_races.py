"""Statistics read while workers come and go: a worker that leaves between two reads is skipped.

The race is made deterministic: the worker deregisters exactly between the
heartbeat check and the read of its description, as a worker stopping at
that moment would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from pipeline.keys import Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.settings import Settings
from pipeline.store import stats
from pipeline.store.connections import connect
from tests.support.fakes import fake_model_info
from tests.support.rest import serving

pytestmark = pytest.mark.anyio
KEYS = Keys("es")
WORKER = "host-1-stopping"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    client = connect(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def register(redis: Any) -> None:
    """A live worker serving the default model, as a worker registers itself."""
    await redis.hset(KEYS.workers, WORKER, orjson.dumps(
        {"model": DEFAULT_MODEL, "backend": "onnx", "host": "host-1", "pid": 1}))
    await redis.set(KEYS.heartbeat(WORKER), b"1", ex=60)
    await redis.hset(KEYS.models, DEFAULT_MODEL, fake_model_info(DEFAULT_MODEL).to_json())


@pytest.fixture
def stops_between_reads(redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker deregisters right after its heartbeat was seen alive."""
    seen_alive = stats.live_workers

    async def then_deregister(client: Any, keys: Keys) -> list[str]:
        alive = await seen_alive(client, keys)
        await redis.hdel(KEYS.workers, WORKER)
        await redis.delete(KEYS.heartbeat(WORKER))
        return alive

    monkeypatch.setattr(stats, "live_workers", then_deregister)


async def test_a_worker_that_stops_between_reads_leaves_no_model_and_no_error(
    redis: Any, stops_between_reads: None
) -> None:
    await register(redis)
    assert await stats.served_models(redis, KEYS) == []


async def test_models_listed_while_the_last_worker_stops_are_200_not_500(
    redis: Any, settings: Settings, stops_between_reads: None
) -> None:
    await register(redis)
    async with serving(settings) as http:
        listed = await http.get("/v1/models")
    assert listed.status_code == 200, listed.text
