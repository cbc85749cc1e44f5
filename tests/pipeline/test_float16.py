"""float16 delivery: base64 of little-endian half floats, within 1e-3 of the stored float32.

The precision check runs on real STS-B dev sentences embedded by the bundled
model; the routes (results, SSE, /v1/embeddings through the official openai
client, MCP tools) run against an in-process worker with HashEmbedder, as the
quantized-delivery tests do.
"""

import base64
import csv
import itertools
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from mcp import Client

from mcp_server.agents import build_mcp
from pipeline.errors import InvalidRequest
from pipeline.jobs.quantize import FLOAT16_MAX, VectorView, check_encoding
from pipeline.model.info import DEFAULT_MODEL
from pipeline.model.torch_backend import SentenceTransformerEmbedder
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder, expected_vector
from tests.support.mcp_sessions import call, call_error, read_all_results, wait_for_status
from tests.support.quantized import SENTENCES
from tests.support.rest import assert_error, parse_sse, serving, submit, wait_done
from tests.support.sts_data import STS_DEV
from tests.support.workers import running

DIMS = 384
TOLERANCE = 1e-3


def decode(value: str) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A float16 vector as the docs tell a client to read it."""
    return np.frombuffer(base64.b64decode(value), "<f2").astype(np.float32)


def dev_sentences(n: int) -> list[str]:
    """The first `n` distinct sentences of STS-B dev."""
    with STS_DEV.open(encoding="utf-8") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        pairs = itertools.chain.from_iterable((row[5], row[6]) for row in rows)
        return list(dict.fromkeys(pairs))[:n]


def test_float16_vectors_of_real_sentences_decode_within_1e3_of_float32() -> None:
    embedder = SentenceTransformerEmbedder(Settings(backend="torch", device="cpu"))
    vectors = embedder.embed(dev_sentences(300)).vectors
    encoded = VectorView("float16").encode(vectors)
    assert all(isinstance(value, str) and len(value) == 1024 for value in encoded)
    decoded = np.vstack([decode(value) for value in encoded])
    assert decoded.shape == vectors.shape
    assert float(np.abs(decoded - vectors).max()) <= TOLERANCE


def test_values_beyond_float16s_range_are_clipped_not_inf() -> None:
    vectors = np.array([[1e6, -1e6, 70000.0, 0.5, -3.0e38]], dtype=np.float32)
    decoded = decode(VectorView("float16").encode(vectors)[0])
    assert np.isfinite(decoded).all()
    assert decoded.tolist() == [FLOAT16_MAX, -FLOAT16_MAX, FLOAT16_MAX, 0.5, -FLOAT16_MAX]


def test_float16_is_an_encoding_and_a_bad_one_names_it() -> None:
    assert check_encoding("float16") == "float16"
    with pytest.raises(InvalidRequest, match="float16"):
        check_encoding("half")


# Through the routes, with a fake worker


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(block_ms=100, chunk_size=4, heartbeat_interval_s=0.2,
                            heartbeat_ttl_s=2.0)


@pytest.fixture
async def app_client(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with (serving(api_settings) as client,
                running(api_settings, HashEmbedder(api_settings))):
        yield client


def assert_close(values: list[str], texts: list[str], **shape: Any) -> None:
    """Each float16 value decodes to within 1e-3 of the vector the worker stored."""
    for value, text in zip(values, texts, strict=True):
        expected = expected_vector(text, DIMS, **shape)
        got = decode(value)
        assert got.shape == expected.shape
        scale = max(1.0, float(np.abs(expected).max()))  # unnormalized: relative 2**-11
        assert float(np.abs(got - expected).max()) <= TOLERANCE * scale


@pytest.mark.anyio
@pytest.mark.parametrize("shape", [{}, {"output_dimensions": 64}, {"normalize": False}],
                         ids=["full", "dimensions", "unnormalized"])
async def test_results_and_events_deliver_float16(
    app_client: httpx.AsyncClient, shape: dict[str, Any]
) -> None:
    options = {"dimensions" if k == "output_dimensions" else k: v for k, v in shape.items()}
    job_id = await submit(app_client, SENTENCES, **options)
    await wait_done(app_client, job_id)
    response = await app_client.get(f"/v1/jobs/{job_id}/results",
                                    params={"encoding": "float16"})
    assert response.status_code == 200, response.text
    assert_close([row["embedding"] for row in response.json()["results"]], SENTENCES, **shape)
    response = await app_client.get(f"/v1/jobs/{job_id}/events",
                                    params={"encoding": "float16"})
    streamed = sorted((row for event in parse_sse(response.text) if event["event"] == "result"
                       for row in event["data"]), key=lambda row: row["index"])
    assert_close([row["embedding"] for row in streamed], SENTENCES, **shape)


@pytest.mark.anyio
async def test_the_openai_client_gets_float16_embeddings(app_client: httpx.AsyncClient) -> None:
    transport = app_client._transport
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1/v1") as http:
        client = openai.AsyncOpenAI(api_key="none", base_url="http://127.0.0.1/v1",
                                    http_client=http)
        raw = await client.embeddings.with_raw_response.create(
            input=SENTENCES, model=DEFAULT_MODEL,
            encoding_format="float16")  # type: ignore[arg-type]
    assert b'"float16"' in raw.http_request.content  # sent as given, not replaced by base64
    data = raw.http_response.json()["data"]
    assert [item["index"] for item in data] == list(range(len(SENTENCES)))
    assert_close([item["embedding"] for item in data], SENTENCES)


@pytest.mark.anyio
async def test_a_bad_encoding_names_float16_among_the_choices(
    app_client: httpx.AsyncClient
) -> None:
    job_id = await submit(app_client, ["x y"])
    await wait_done(app_client, job_id)
    for route in ("results", "events"):
        response = await app_client.get(f"/v1/jobs/{job_id}/{route}",
                                        params={"encoding": "float8"})
        assert_error(response, 400, None, "'encoding'", "float16")
    response = await app_client.post("/v1/embeddings", json={
        "input": ["x"], "encoding_format": "half"})
    assert_error(response, 422, None, "'encoding_format'", "float16")


@pytest.mark.anyio
async def test_mcp_embed_and_job_results_deliver_float16(api_settings: Settings) -> None:
    pipeline = Pipeline(api_settings)
    try:
        async with (running(api_settings, HashEmbedder(api_settings)),
                    Client(build_mcp(api_settings, pipeline)) as client):
            embedded = await call(client, "embed", inputs=SENTENCES, encoding="float16")
            assert_close(embedded["embeddings"], SENTENCES)
            handle = await call(client, "submit_job", inputs=SENTENCES)
            await wait_for_status(client, handle["job_id"], "completed", 10)
            rows = await read_all_results(client, handle["job_id"], limit=2,
                                          encoding="float16")
            assert_close([row["embedding"] for row in rows], SENTENCES)
            assert "float16" in await call_error(client, "embed", inputs=["x"],
                                                 encoding="half")
    finally:
        await pipeline.close()
