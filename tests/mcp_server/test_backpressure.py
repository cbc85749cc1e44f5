"""Backpressure: past the backlog limit a submission is 429 with Retry-After, and nothing is queued.

No worker runs, so whatever is queued stays queued. The limit is 8 texts per
model (chunks of 4); a job of 8 fills it, and the next job, JSON or NDJSON
(whose size is only known once it is read), REST or MCP, is refused whole.
Interactive requests keep their own budget over the fast lane, so a full
bulk lane does not refuse them (a job made for an interactive call does count).
"""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client

from mcp_server.agents import build_mcp
from pipeline.errors import Overloaded
from pipeline.inputs import Item, JobOptions
from pipeline.keys import Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.store.connections import connect
from tests.support.rest import serving

pytestmark = pytest.mark.anyio
KEYS = Keys("es")


@pytest.fixture
def limited(settings: Settings) -> Settings:
    return settings.replace(chunk_size=4, fast_lane_max_texts=4, max_backlog=8,
                            interactive_backlog=8)


async def queued(redis: Any) -> tuple[int, int]:
    """(queue entries, job records)."""
    entries = sum([await redis.xlen(stream) for stream in KEYS.queues(DEFAULT_MODEL)])
    jobs = len([key async for key in redis.scan_iter(match="es:{*}:job")])
    return entries, jobs


async def test_past_the_backlog_jobs_are_429_with_retry_after_and_nothing_is_queued(
    limited: Settings
) -> None:
    assert limited.redis_url
    redis = connect(limited.redis_url)
    try:
        async with serving(limited) as http:
            first = await http.post("/v1/jobs", json={"inputs": [f"t{i}" for i in range(8)]})
            assert first.status_code == 202, first.text
            before = await queued(redis)
            refused = await http.post("/v1/jobs", json={"inputs": ["one more"]})
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "overloaded"
            assert 1 <= int(refused.headers["retry-after"]) <= 3600
            assert "retry in" in refused.json()["error"]["message"]
            ndjson = await http.post("/v1/jobs", content=b'"a"\n"b"\n',
                                     headers={"content-type": "application/x-ndjson"})
            assert ndjson.status_code == 429, ndjson.text
            assert "retry-after" in ndjson.headers
            assert await queued(redis) == before
            assert [key async for key in redis.scan_iter(match="es:{*}:inputs")] == [
                f"es:{{{first.json()['id']}}}:inputs".encode()]
            listed = (await http.get("/v1/jobs")).json()["jobs"]
            assert [job["id"] for job in listed] == [first.json()["id"]]
    finally:
        await redis.aclose()


async def test_mcp_submit_job_past_the_backlog_is_a_tool_error_saying_when_to_retry(
    limited: Settings
) -> None:
    pipeline = Pipeline(limited)
    try:
        async with Client(build_mcp(limited, pipeline)) as client:
            ok = await client.call_tool("submit_job", {"inputs": [f"t{i}" for i in range(8)]})
            assert not ok.is_error
            refused = await client.call_tool("submit_job", {"inputs": ["one more"]})
        text = " ".join(getattr(block, "text", "") for block in refused.content)
        assert refused.is_error and "overloaded" in text and "retry in" in text
        assert await queued(pipeline.redis) == (2, 1)
        # The bulk lane is full; interactive requests have a budget of their own.
        fast = KEYS.queue(DEFAULT_MODEL, "fast")
        assert isinstance(await pipeline.requests.sender.send(fast, [Item("q")], {}), str)
    finally:
        await pipeline.close()


async def test_past_the_interactive_budget_a_request_is_429_and_nothing_is_queued(
    limited: Settings
) -> None:
    pipeline = Pipeline(limited)
    fast = KEYS.queue(DEFAULT_MODEL, "fast")
    try:
        # Two waiting requests count as two entries of 4 texts: the budget of 8 is full.
        for text in ("first", "second"):
            assert isinstance(await pipeline.requests.sender.send(fast, [Item(text)], {}), str)
        assert await pipeline.requests.sender.send(fast, [Item("third")], {}) == 8
        with pytest.raises(Overloaded, match="retry in"):
            await pipeline.embed([Item("a query")], JobOptions())
        async with serving(limited) as http:
            refused = await http.post("/v1/embeddings", json={"input": "a query"})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "overloaded"
        assert 1 <= int(refused.headers["retry-after"]) <= 3600
        assert await pipeline.redis.xlen(fast) == 2
    finally:
        await pipeline.close()
