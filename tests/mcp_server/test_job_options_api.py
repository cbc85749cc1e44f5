"""Chunking, prompts and quantized delivery through REST, SSE, /v1/embeddings and openai.

An in-process worker embeds with HashEmbedder (a text's vector is a hash of
the exact text the model sees), so a prompt or a window shows in the vectors
exactly; the calibration corpus is recorded as `embedstream worker` records it.
"""

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import numpy as np
import openai
import pytest

from mcp_server.app import create_app
from pipeline.keys import Keys
from pipeline.model.embedder import shape_vectors
from pipeline.model.info import DEFAULT_MODEL
from pipeline.model.tokens import tokenizer
from pipeline.model.windows import split_windows
from pipeline.settings import Settings
from pipeline.store.connections import connect
from tests.support.fakes import HashEmbedder, raw_vector, token_count
from tests.support.quantized import QUANTIZED, SENTENCES, reference
from tests.support.rest import assert_error, parse_sse, submit, wait_done
from workers.calibration import calibrate
from workers.worker import run_worker

pytestmark = pytest.mark.anyio

DIMS = 384
KEYS = Keys("es")
@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(block_ms=100, chunk_size=4, fast_lane_max_texts=4,
                            batch_max_texts=64, heartbeat_interval_s=0.2, heartbeat_ttl_s=2.0)


@contextlib.asynccontextmanager
async def worker_running(settings: Settings) -> AsyncIterator[HashEmbedder]:
    embedder = HashEmbedder(settings)
    await calibrate(settings, embedder)
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_worker(settings, embedder, stop, ready))
    with anyio.fail_after(10):
        await ready.wait()
    try:
        yield embedder
    finally:
        stop.set()
        with anyio.fail_after(10):
            await task


@pytest.fixture
async def app_client(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(api_settings, with_mcp=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with (worker_running(api_settings),
                    httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client):
            yield client


async def results(client: httpx.AsyncClient, job_id: str, encoding: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/jobs/{job_id}/results",
                                params={"encoding": encoding, "limit": 1000})
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["results"]
    return rows


# Quantized delivery


@pytest.mark.parametrize("dimensions", [None, 64])
async def test_quantized_results_and_events_equal_quantize_embeddings(
    app_client: httpx.AsyncClient, dimensions: int | None
) -> None:
    job_id = await submit(app_client, SENTENCES, dimensions=dimensions)
    await wait_done(app_client, job_id)
    floats = [row["embedding"] for row in await results(app_client, job_id, "float")]
    for encoding in QUANTIZED:
        rows = await results(app_client, job_id, encoding)
        assert [row["embedding"] for row in rows] == reference(floats, encoding, dimensions)
        response = await app_client.get(f"/v1/jobs/{job_id}/events",
                                        params={"encoding": encoding})
        streamed = sorted((row for e in parse_sse(response.text) if e["event"] == "result"
                           for row in e["data"]), key=lambda row: row["index"])
        assert [row["embedding"] for row in streamed] == reference(floats, encoding, dimensions)


async def test_quantized_embeddings_equal_quantize_embeddings(
    app_client: httpx.AsyncClient
) -> None:
    floats = (await app_client.post("/v1/embeddings", json={"input": SENTENCES})).json()
    vectors = [item["embedding"] for item in floats["data"]]
    for encoding in QUANTIZED:
        response = await app_client.post("/v1/embeddings", json={
            "input": SENTENCES, "encoding_format": encoding})
        assert response.status_code == 200, response.text
        got = [item["embedding"] for item in response.json()["data"]]
        assert got == reference(vectors, encoding)
    assert len(got[0]) == DIMS // 8


async def test_int8_without_recorded_calibration_is_a_503_that_says_why(
    api_settings: Settings, app_client: httpx.AsyncClient
) -> None:
    job_id = await submit(app_client, ["x y"])
    await wait_done(app_client, job_id)
    assert api_settings.redis_url
    raw = connect(api_settings.redis_url)
    await raw.delete(KEYS.calibration(DEFAULT_MODEL))
    await raw.aclose()
    response = await app_client.get(f"/v1/jobs/{job_id}/results", params={"encoding": "int8"})
    assert_error(response, 503, "unavailable", "no int8/uint8 ranges", "worker")
    response = await app_client.get(f"/v1/jobs/{job_id}/events", params={"encoding": "uint8"})
    assert_error(response, 503, "unavailable", "no int8/uint8 ranges")
    assert len((await results(app_client, job_id, "binary"))[0]["embedding"]) == DIMS // 8


# Prompts


async def test_a_prompt_is_what_the_model_sees_and_counts_in_usage(
    app_client: httpx.AsyncClient
) -> None:
    response = await app_client.post("/v1/embeddings", json={
        "input": SENTENCES[:2], "prompt": "query: ", "encoding_format": "float"})
    assert response.status_code == 200, response.text
    data = response.json()
    for item, text in zip(data["data"], SENTENCES[:2], strict=True):
        expected = shape_vectors(raw_vector("query: " + text, DIMS)[None, :], None, True)[0]
        assert item["embedding"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert data["usage"]["prompt_tokens"] == sum(token_count("query: " + t) for t in SENTENCES[:2])


async def test_an_unknown_prompt_name_is_a_422_listing_the_models_prompts(
    app_client: httpx.AsyncClient
) -> None:
    response = await app_client.post("/v1/jobs", json={"inputs": ["a"], "prompt_name": "nope"})
    assert_error(response, 422, "invalid_input", "'nope'", "prompts")
    response = await app_client.post("/v1/embeddings", json={"input": "a", "prompt_name": "x"})
    assert_error(response, 422, "invalid_input", "'x'")


async def test_ndjson_uploads_take_prompt_and_chunk_as_query_parameters(
    app_client: httpx.AsyncClient
) -> None:
    body = b'"first text"\n"second text"\n'
    response = await app_client.post("/v1/jobs?prompt=passage:%20&chunk=true&chunk_overlap=8",
                                     content=body,
                                     headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 202, response.text
    await wait_done(app_client, response.json()["id"])
    rows = await results(app_client, response.json()["id"], "float")
    assert [row["chunks"] for row in rows] == [1, 1]
    expected = shape_vectors(raw_vector("passage: first text", DIMS)[None, :], None, True)[0]
    assert rows[0]["embedding"] == pytest.approx(expected.tolist(), abs=1e-6)


# Chunking


def windows_of(text: str, overlap: int = 32) -> list[tuple[str, int]]:
    """The windows the spec defines, computed here from the tokenizer's offsets."""
    encoding = tokenizer(DEFAULT_MODEL).encode(text, add_special_tokens=False)
    return split_windows(text, encoding.offsets, 256 - 2, overlap)


async def test_a_chunked_long_text_is_the_token_weighted_mean_of_its_windows(
    app_client: httpx.AsyncClient
) -> None:
    long_text = " ".join(f"word{i % 50} of the long text" for i in range(150))
    job_id = await submit(app_client, [long_text, "short one"], chunk=True, truncate=False)
    job = await wait_done(app_client, job_id)
    assert job["status"] == "completed"
    rows = await results(app_client, job_id, "float")
    windows = windows_of(long_text)
    assert [row["chunks"] for row in rows] == [len(windows), 1] and len(windows) > 2
    assert [row["truncated"] for row in rows] == [False, False]
    weights = np.array([n for _, n in windows], dtype=np.float64)
    mean = sum(w * raw_vector(t, DIMS).astype(np.float64)
               for (t, _), w in zip(windows, weights, strict=True)) / weights.sum()
    expected = shape_vectors(mean.astype(np.float32)[None, :], None, True)[0]
    assert rows[0]["embedding"] == pytest.approx(expected.tolist(), abs=1e-6)


async def test_without_chunk_results_carry_no_chunks(app_client: httpx.AsyncClient) -> None:
    job_id = await submit(app_client, ["a b"])
    await wait_done(app_client, job_id)
    assert "chunks" not in (await results(app_client, job_id, "float"))[0]


async def test_a_chunk_overlap_over_half_a_window_is_refused(
    app_client: httpx.AsyncClient
) -> None:
    response = await app_client.post("/v1/jobs", json={"inputs": ["a"], "chunk": True,
                                                       "chunk_overlap": 200})
    assert_error(response, 422, "invalid_input", "'chunk_overlap'", "128")


async def test_a_prompt_that_would_crowd_the_text_out_of_every_window_is_refused(
    app_client: httpx.AsyncClient
) -> None:
    prompt = "w " * 254  # 254 tokens
    response = await app_client.post("/v1/jobs", json={"inputs": ["a " * 300], "chunk": True,
                                                       "prompt": prompt})
    assert_error(response, 422, "invalid_input", "at most 127")
    response = await app_client.post("/v1/embeddings", json={"input": "a " * 300, "chunk": True,
                                                             "prompt": prompt})
    assert_error(response, 422, "invalid_input", "at most 127")


# Models


async def test_models_lists_what_live_workers_serve(app_client: httpx.AsyncClient) -> None:
    listing = (await app_client.get("/v1/models")).json()
    assert listing["object"] == "list"
    [model] = listing["data"]
    assert model["id"] == DEFAULT_MODEL and model["object"] == "model"
    assert (model["dimensions"], model["max_tokens"]) == (DIMS, 256)
    # A fake worker reports the backend its settings name (the default here).
    assert model["backend"] == Settings().backend
    assert model["prompts"] == {"query": "", "document": ""}


# The official client


async def test_the_openai_client_carries_every_new_option(
    app_client: httpx.AsyncClient
) -> None:
    transport = app_client._transport
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1/v1") as http:
        client = openai.AsyncOpenAI(api_key="none", base_url="http://127.0.0.1/v1",
                                    http_client=http)
        plain = await client.embeddings.create(input=SENTENCES[:2], model=DEFAULT_MODEL)
        prompted = await client.embeddings.create(
            input=SENTENCES[:2], model=DEFAULT_MODEL,
            extra_body={"prompt": "query: ", "chunk": True, "chunk_overlap": 16})
        assert plain.data[0].embedding != prompted.data[0].embedding
        expected = shape_vectors(raw_vector("query: " + SENTENCES[0], DIMS)[None, :], None,
                                 True)[0]
        assert prompted.data[0].embedding == pytest.approx(expected.tolist(), abs=1e-6)
        floats = [item.embedding for item in plain.data]
        for encoding in QUANTIZED:
            quantized = await client.embeddings.create(
                input=SENTENCES[:2], model=DEFAULT_MODEL,
                encoding_format=encoding)  # type: ignore[arg-type]
            got = [list(map(int, item.embedding)) for item in quantized.data]
            assert got == reference(floats, encoding)
        b64 = await client.embeddings.create(input=SENTENCES[:1], model=DEFAULT_MODEL,
                                             encoding_format="base64")
        assert isinstance(b64.data[0].embedding, str)
        decoded = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")
        assert decoded.tolist() == pytest.approx(floats[0], abs=1e-6)
