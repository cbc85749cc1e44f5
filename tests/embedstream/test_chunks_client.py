"""The Python client hands a job's chunks (`chunk_output="chunks"`) over as typed data.

The app runs in-process behind `httpx.ASGITransport` with an in-process
worker whose fake embedder makes a text's vector from a hash of the text,
so a chunk's vector names the characters it was made from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest

from embedstream import AsyncClient, Chunk, Result
from mcp_server.app import create_app
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder, expected_vector
from tests.support.workers import running

pytestmark = pytest.mark.anyio

DIMS = 384
TEXT = ("The river bends twice before the town. Boats wait at the second bend for the "
        "tide. Nobody remembers who built the old stone bridge, but everyone crosses it.")


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncClient]:
    settings = settings.replace(block_ms=100)
    app = create_app(settings, with_mcp=False)
    async with running(settings, HashEmbedder(settings)), app.router.lifespan_context(app):
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://127.0.0.1")
        async with AsyncClient("http://test", http=http) as es:
            yield es


async def results_of(client: AsyncClient, texts: list[str], **options: object
                     ) -> list[Result]:
    job = await client.submit(texts, **options)
    return sorted([r async for r in job.results()], key=lambda r: r.index)


async def test_results_carry_each_chunk_with_its_offsets_and_float32_vector(
    client: AsyncClient
) -> None:
    [result, short] = await results_of(client, [TEXT, "One line."], chunk=True,
                                       chunk_output="chunks", chunk_tokens=8, chunk_overlap=2,
                                       dimensions=64)
    assert result.chunking == "separate" and result.chunks is not None
    assert len(result.chunks) > 3 and all(isinstance(c, Chunk) for c in result.chunks)
    assert result.chunks[0].start == 0 and result.chunks[-1].end == len(TEXT)
    for chunk in result.chunks:
        assert chunk.embedding.dtype == np.float32 and chunk.embedding.shape == (64,)
        want = expected_vector(TEXT[chunk.start:chunk.end], DIMS, output_dimensions=64)
        np.testing.assert_allclose(chunk.embedding, want, atol=1e-6)
        assert 1 <= chunk.tokens <= 8
    assert short.chunks is not None and [(c.start, c.end) for c in short.chunks] == [(0, 9)]
    assert "chunks" not in result.extra and "chunking" not in result.extra


async def test_sentence_chunks_end_where_sentences_end(client: AsyncClient) -> None:
    [result] = await results_of(client, [TEXT], chunk=True, chunk_output="chunks",
                                chunk_boundary="sentence", chunk_tokens=16)
    assert result.chunks is not None
    assert [TEXT[c.start:c.end][-1] for c in result.chunks] == [".", ".", "."]


async def test_a_pooled_chunked_result_has_no_chunks_but_its_window_count(
    client: AsyncClient
) -> None:
    [result] = await results_of(client, [TEXT], chunk=True)
    assert result.chunks is None and result.chunking is None
    assert result.extra["chunks"] == 1
    np.testing.assert_allclose(result.embedding, expected_vector(TEXT, DIMS), atol=1e-6)
