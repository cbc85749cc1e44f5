"""The MCP tools and the job resource, in process, with the real model and a real worker.

The official MCP client talks to the server object directly (the SDK's
in-process connection), and a worker runs in the same event loop against the
test's own Valkey. Transports are covered in test_mcp_transports.py.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import ResourceUpdated
from sentence_transformers import SentenceTransformer
from starlette.applications import Starlette
from starlette.middleware import Middleware

from mcp_server.agents import build_mcp, mcp_lifespan, mcp_routes
from mcp_server.host_guard import HostGuard, HostPolicy
from pipeline.model.embedder import Embedder
from pipeline.model.info import bundled_model_dir
from pipeline.model.loading import load_embedder
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.mcp_sessions import (
    TOOLS,
    call,
    call_error,
    exercise_every_tool,
    read_all_results,
    sts_dev_pairs,
    vector,
    wait_for_status,
)
from workers.worker import run_worker

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    """The worker's embedder: the real bundled model."""
    return load_embedder(Settings())


@pytest.fixture(scope="module")
def reference_model() -> SentenceTransformer:
    """The same model loaded directly, to check the pipeline's vectors against."""
    return SentenceTransformer(str(bundled_model_dir()))


@pytest.fixture(scope="module")
def sts() -> list[tuple[float, str, str]]:
    return sts_dev_pairs()


@asynccontextmanager
async def running_worker(settings: Settings, embedder: Embedder) -> AsyncIterator[None]:
    """A worker in this event loop until the block ends."""
    stop, ready = asyncio.Event(), asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, embedder, stop, ready))
    try:
        with anyio.fail_after(30):
            await ready.wait()
        yield
    finally:
        stop.set()
        await worker


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[Client]:
    """A client on an in-process MCP server."""
    pipeline = Pipeline(settings)
    try:
        async with Client(build_mcp(settings, pipeline)) as client:
            yield client
    finally:
        await pipeline.close()


@asynccontextmanager
async def connected(settings: Settings, embedder: Embedder | None) -> AsyncIterator[Client]:
    """A client on an in-process MCP server, with a worker running unless `embedder` is None."""
    if embedder is None:
        async with serving(settings) as client:
            yield client
        return
    async with running_worker(settings, embedder), serving(settings) as client:
        yield client


@pytest.mark.slow
async def test_every_tool_and_the_job_resource_work_end_to_end(
    settings: Settings, embedder: Embedder
) -> None:
    async with connected(settings, embedder) as client:
        await exercise_every_tool(client)


async def test_tool_descriptions_tell_an_agent_when_to_use_them_and_their_limits(
    settings: Settings
) -> None:
    async with connected(settings, None) as client:
        tools = {tool.name: tool for tool in (await client.list_tools()).tools}
    said = {name: tool.description or "" for name, tool in tools.items()}
    assert "512" in said["embed"] and "submit_job" in said["embed"]
    assert "search_job" in said["similarity"]
    assert "job_status" in said["submit_job"]
    assert "base64" in said["job_results"]
    assert all("Returns" in description for description in said.values())
    assert tools["search_job"].input_schema["properties"]["top_k"]["maximum"] == 100
    assert tools["cancel_job"].annotations and tools["cancel_job"].annotations.destructive_hint
    assert tools["embed"].output_schema and "embeddings" in tools["embed"].output_schema[
        "properties"]


@pytest.mark.slow
async def test_embed_returns_the_vectors_sentence_transformers_computes(
    settings: Settings, embedder: Embedder, reference_model: SentenceTransformer,
    sts: list[tuple[float, str, str]],
) -> None:
    texts = [first for _, first, _ in sts[:40]]
    async with connected(settings, embedder) as client:
        floats = await call(client, "embed", inputs=texts)
        packed = await call(client, "embed", inputs=texts, encoding="base64")
    expected = reference_model.encode(texts, convert_to_numpy=True)
    got = np.asarray(floats["embeddings"], dtype=np.float32)
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    cosine = (got * expected).sum(1) / norms
    assert cosine.min() >= 0.9999  # the default backend's bound (auto; onnx alone: 0.99999)
    assert floats["model"] == "all-MiniLM-L6-v2" and floats["dimensions"] == 384
    assert np.array_equal(np.vstack([vector(v) for v in packed["embeddings"]]), got)


@pytest.mark.slow
async def test_embed_progress_rises_strictly_to_the_total(
    settings: Settings, embedder: Embedder, sts: list[tuple[float, str, str]]
) -> None:
    texts = [second for _, _, second in sts[:150]]  # five chunks of 32 texts or fewer
    seen: list[tuple[float, float | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total))

    async with connected(settings, embedder) as client:
        result = await client.call_tool("embed", {"inputs": texts}, progress_callback=on_progress)
    assert not result.is_error
    done = [value for value, _ in seen]
    assert len(done) >= 3
    assert all(a < b for a, b in itertools.pairwise(done))
    assert done[0] == 0 and done[-1] == len(texts)
    assert {total for _, total in seen} == {len(texts)}


@pytest.mark.slow
async def test_similarity_ranks_high_scoring_sts_pairs_above_low_scoring_ones(
    settings: Settings, embedder: Embedder, sts: list[tuple[float, str, str]]
) -> None:
    by_first: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for score, first, second in sts:
        by_first[first].append((score, second))
    groups = {first: pairs for first, pairs in by_first.items()
              if max(pairs)[0] - min(pairs)[0] >= 2.0}
    assert groups
    async with connected(settings, embedder) as client:
        for first, pairs in groups.items():
            candidates = [second for _, second in pairs]
            ranked = await call(client, "similarity", query=first, candidates=candidates)
            order = [match["index"] for match in ranked["matches"]]
            best = candidates.index(max(pairs)[1])
            worst = candidates.index(min(pairs)[1])
            assert order.index(best) < order.index(worst), (first, ranked)
            scores = [match["score"] for match in ranked["matches"]]
            assert scores == sorted(scores, reverse=True)


@pytest.mark.slow
async def test_a_job_pages_every_index_once_and_finds_its_own_sentence_first(
    settings: Settings, embedder: Embedder, sts: list[tuple[float, str, str]]
) -> None:
    texts = [text for _, first, second in sts[:60] for text in (first, second)]
    async with connected(settings, embedder) as client:
        handle = await call(client, "submit_job", inputs=texts)
        await wait_for_status(client, handle["job_id"], "completed", 120)
        rows = await read_all_results(client, handle["job_id"], limit=17)
        query = texts[33]
        found = await call(client, "search_job", job_id=handle["job_id"], query=query, top_k=5)
    assert sorted(row["index"] for row in rows) == list(range(len(texts)))
    assert len(rows) == len(texts)
    assert found["matches"][0]["text"] == query
    assert found["matches"][0]["score"] == pytest.approx(1.0, abs=1e-5)


async def test_a_retried_submission_with_the_same_idempotency_key_returns_the_same_job(
    settings: Settings
) -> None:
    async with connected(settings, None) as client:
        first = await call(client, "submit_job", inputs=["a", "b"], idempotency_key="retry-1")
        again = await call(client, "submit_job", inputs=["a", "b"], idempotency_key="retry-1")
        other = await call(client, "submit_job", inputs=["a", "b"], idempotency_key="retry-2")
    assert again["job_id"] == first["job_id"]
    assert other["job_id"] != first["job_id"]


async def test_cancel_job_stops_a_queued_job(settings: Settings) -> None:
    async with connected(settings, None) as client:
        handle = await call(client, "submit_job", inputs=["one", "two", "three"])
        cancelled = await call(client, "cancel_job", job_id=handle["job_id"])
        status = await call(client, "job_status", job_id=handle["job_id"])
        page = await call(client, "job_results", job_id=handle["job_id"])
    assert cancelled["status"] == status["status"] == "cancelled"
    assert page == {"results": [], "next_cursor": None, "backend": None}


BAD_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("embed", {"inputs": ["x"] * 513}, "at most 512 texts"),
    ("embed", {"inputs": ["fine", "   "]}, "inputs[1] is empty"),
    ("embed", {"inputs": []}, "empty"),
    ("embed", {"inputs": "not a list"}, "valid list"),
    ("embed", {"inputs": ["x"], "dimensions": 1000}, "at most 384"),
    ("embed", {"inputs": ["x"], "dimensions": 0}, "positive integer"),
    ("embed", {"inputs": ["x"], "model": "no-such-model"}, "not served here"),
    ("embed", {"inputs": ["x"], "encoding": "hex"}, "'float'"),
    ("embed", {"inputs": ["x"]}, "no worker is running"),
    ("similarity", {"query": "q", "candidates": ["x"] * 600}, "at most 511 candidates"),
    ("similarity", {"query": " ", "candidates": ["x"]}, "query is empty"),
    ("similarity", {"query": "q", "candidates": ["x", ""]}, "candidates[1] is empty"),
    ("submit_job", {"inputs": []}, "'inputs' is empty"),
    ("submit_job", {"inputs": [{"txt": "x"}]}, "inputs[0] has unknown field"),
    ("submit_job", {"inputs": [42]}, "inputs[0] must be a string"),
    ("submit_job", {"inputs": ["x"], "idempotency_key": "k" * 300}, "1 to 255"),
    ("submit_job", {"inputs": ["x"], "normalize": "maybe"}, "valid boolean"),
    ("job_status", {"job_id": "nope"}, "malformed job id"),
    ("job_status", {"job_id": "0" * 32}, "does not exist"),
    ("job_status", {}, "Field required"),
    ("job_results", {"job_id": "0" * 32, "limit": 0}, "limit must be from 1 to 1000"),
    ("job_results", {"job_id": "0" * 32, "limit": "ten"}, "valid integer"),
    ("search_job", {"job_id": "0" * 32, "query": "q", "top_k": 101}, "top_k must be from 1 to 100"),
    ("search_job", {"job_id": "0" * 32, "query": "q", "top_k": 0}, "top_k must be from 1 to 100"),
    ("cancel_job", {"job_id": "../../etc"}, "malformed job id"),
]


@pytest.mark.parametrize(("tool", "arguments", "message"), BAD_CALLS,
                         ids=[f"{tool}-{i}" for i, (tool, _, _) in enumerate(BAD_CALLS)])
async def test_bad_calls_come_back_as_tool_errors_an_agent_can_act_on(
    settings: Settings, tool: str, arguments: dict[str, Any], message: str
) -> None:
    async with connected(settings, None) as client:
        assert message in await call_error(client, tool, **arguments)
        assert len((await client.list_tools()).tools) == len(TOOLS)  # the session goes on


async def test_search_job_on_an_unfinished_job_says_to_wait(settings: Settings) -> None:
    async with connected(settings, None) as client:
        handle = await call(client, "submit_job", inputs=["queued, no worker"])
        text = await call_error(client, "search_job", job_id=handle["job_id"], query="q")
    assert "job_not_finished" in text and "is queued" in text and "poll its status" in text


async def test_reading_an_unknown_job_resource_is_a_not_found_error(settings: Settings) -> None:
    async with connected(settings, None) as client:
        with pytest.raises(MCPError, match="does not exist"):
            await client.read_resource(f"embedstream://jobs/{'0' * 32}")
        with pytest.raises(MCPError, match="malformed job id"):
            await client.read_resource("embedstream://jobs/nope")


@pytest.mark.slow
async def test_resource_subscribers_hear_when_their_job_changes(
    settings: Settings, embedder: Embedder
) -> None:
    async with serving(settings) as client:
        handle = await call(client, "submit_job", inputs=[f"text {i}" for i in range(70)])
        uri = handle["resource"]
        heard: list[object] = []
        # The worker starts only once we listen, so every change happens while we do.
        async with (client.listen(resource_subscriptions=[uri]) as updates,
                    running_worker(settings, embedder)):
            with anyio.fail_after(60):
                while '"completed"' not in await resource_text(client, uri):
                    heard.append(await anext(updates))
    assert heard and set(heard) == {ResourceUpdated(uri=uri)}


async def resource_text(client: Client, uri: str) -> str:
    read = await client.read_resource(uri, cache_mode="bypass")
    return str(getattr(read.contents[0], "text", ""))


@pytest.mark.parametrize(("headers", "status"), [
    ({"host": "evil.example"}, 421),
    ({"host": "127.0.0.1:8000", "origin": "http://evil.example"}, 403),
    ({"host": "localhost:1234", "origin": "http://localhost:5173"}, 400),
    ({"host": "embed.example.com"}, 400),
    ({"host": "embed.example.com:8443", "origin": "https://embed.example.com:8443"}, 400),
    ({"host": "embed.example.com", "origin": "https://app.example.com"}, 400),
    ({"host": "embed.example.com", "origin": "https://other.example.com"}, 403),
])
async def test_mcp_endpoints_accept_loopback_and_configured_hosts_and_origins_only(
    settings: Settings, headers: dict[str, str], status: int
) -> None:
    configured = settings.replace(allowed_hosts=("embed.example.com",),
                                  allowed_origins=("https://app.example.com",))
    pipeline = Pipeline(configured)
    mcp = build_mcp(configured, pipeline)
    guard = Middleware(HostGuard, policy=HostPolicy.from_settings(configured))
    app = Starlette(routes=mcp_routes(mcp), middleware=[guard])
    try:
        # A text/plain POST passes the guard and is refused by the SDK itself with 400.
        async with mcp_lifespan(mcp), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
            for path in ("/mcp", "/sse/messages/"):
                reply = await http.post(path, content=b"{}", headers={
                    "content-type": "text/plain", **headers})
                assert reply.status_code == status, (path, reply.text)
            if status in (403, 421):
                sse = await http.get("/sse", headers=headers)
                assert sse.status_code == status
                assert "EMBEDSTREAM_ALLOWED_" in sse.json()["error"]["message"]
    finally:
        await pipeline.close()
