"""MCP tools with the new options: quantized encodings, prompts, chunking, and list_models."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import numpy as np
import pytest
from mcp import Client

from mcp_server.agents import build_mcp
from pipeline.model.embedder import shape_vectors
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder, raw_vector
from tests.support.mcp_sessions import call, call_error, read_all_results, wait_for_status
from tests.support.quantized import QUANTIZED, SENTENCES, reference
from workers.calibration import calibrate
from workers.worker import run_worker

pytestmark = pytest.mark.anyio
DIMS = 384


@asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[Client]:
    """An in-process MCP client, with a calibrated fake worker."""
    embedder = HashEmbedder(settings)
    await calibrate(settings, embedder)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_worker(settings, embedder, stop, ready))
    pipeline = Pipeline(settings)
    try:
        with anyio.fail_after(10):
            await ready.wait()
        async with Client(build_mcp(settings, pipeline)) as client:
            yield client
    finally:
        stop.set()
        await task
        await pipeline.close()


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[Client]:
    async with connected(settings.replace(block_ms=100)) as mcp_client:
        yield mcp_client


async def test_embed_and_job_results_deliver_quantize_embeddings(client: Client) -> None:
    floats = (await call(client, "embed", inputs=SENTENCES))["embeddings"]
    handle = await call(client, "submit_job", inputs=SENTENCES)
    await wait_for_status(client, handle["job_id"], "completed", 10)
    for encoding in QUANTIZED:
        embedded = await call(client, "embed", inputs=SENTENCES, encoding=encoding)
        assert embedded["embeddings"] == reference(floats, encoding)
        rows = await read_all_results(client, handle["job_id"], limit=2, encoding=encoding)
        assert [row["embedding"] for row in rows] == reference(floats, encoding)


async def test_embed_takes_a_prompt_and_chunks(client: Client) -> None:
    embedded = await call(client, "embed", inputs=SENTENCES[:2], prompt="query: ",
                          chunk=True)
    expected = shape_vectors(raw_vector("query: " + SENTENCES[0], DIMS)[None, :], None, True)
    assert np.allclose(embedded["embeddings"][0], expected[0], atol=1e-6)
    assert embedded["chunks"] == [1, 1]
    error = await call_error(client, "embed", inputs=["x"], prompt_name="nope")
    assert "invalid_input: unknown prompt_name 'nope'" in error and "'document', 'query'" in error


async def test_list_models_names_the_served_model(client: Client) -> None:
    listing = await call(client, "list_models")
    [model] = listing["data"]
    assert model["id"] == DEFAULT_MODEL and model["dimensions"] == DIMS
    assert model["max_tokens"] == 256 and model["prompts"] == {"query": "", "document": ""}


