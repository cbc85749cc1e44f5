"""Per-chunk vectors in a batch's output lines, and `usage` on `/v1/embeddings` with chunks.

The app runs in-process behind `httpx.ASGITransport` with an in-process
worker. The fake embedder makes a text's vector from a hash of the text and
counts a token a word plus two, so an output's chunks and token counts can
be checked exactly; late chunking needs token embeddings, so its `usage` is
checked with the bundled model on the torch backend.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import orjson
import pytest

from pipeline.model.info import DEFAULT_MODEL
from pipeline.model.spans import ChunkSpec, plan_chunks
from pipeline.model.tokens import tokenizer
from pipeline.model.torch_backend import SentenceTransformerEmbedder
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder, token_count
from tests.support.rest import serving
from tests.support.workers import running

pytestmark = pytest.mark.anyio

STORY = " ".join(f"Part {i} of the story tells of a {word} river and the town beside it."
                 for i, word in enumerate(["quiet", "broad", "winding", "frozen", "swift",
                                           "muddy", "narrow", "deep"]))
CHUNKS = {"chunk": True, "chunk_output": "chunks", "chunk_tokens": 16, "chunk_overlap": 4}


@pytest.fixture
def fast(settings: Settings) -> Settings:
    return settings.replace(block_ms=100, chunk_size=2)


@pytest.fixture
async def http(fast: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with running(fast, HashEmbedder(fast)), serving(fast) as client:
        yield client


async def batch_output(http: httpx.AsyncClient, lines: list[dict[str, Any]]
                       ) -> list[dict[str, Any]]:
    """Run `lines` as a batch to its end; its output file's lines."""
    body = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    stored = await http.post("/v1/files", files={"file": ("in.jsonl", body)},
                             data={"purpose": "batch"})
    assert stored.status_code == 200, stored.text
    created = await http.post("/v1/batches", json={
        "input_file_id": stored.json()["id"], "endpoint": "/v1/embeddings",
        "completion_window": "24h"})
    assert created.status_code == 200, created.text
    with anyio.fail_after(20):
        while (batch := (await http.get(f"/v1/batches/{created.json()['id']}")).json())[
                "status"] not in ("completed", "failed", "expired", "cancelled"):
            await anyio.sleep(0.05)
    assert batch["status"] == "completed" and batch["error_file_id"] is None, batch
    content = await http.get(f"/v1/files/{batch['output_file_id']}/content")
    return [orjson.loads(line) for line in content.content.splitlines()]


def request(custom_id: str, texts: list[str], **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": DEFAULT_MODEL, "input": texts, **body}}


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_a_batch_request_asking_for_chunks_gets_them_as_v1_embeddings_gives_them(
    http: httpx.AsyncClient, encoding: str
) -> None:
    asked = {"a": [STORY, "A short text."], "b": [STORY[:200]]}
    options = {**CHUNKS, "encoding_format": encoding}
    lines = await batch_output(http, [request(k, v, **options) for k, v in asked.items()])
    assert [line["custom_id"] for line in lines] == list(asked)
    for line, texts in zip(lines, asked.values(), strict=True):
        direct = await http.post("/v1/embeddings", json={"input": texts, **options})
        assert direct.status_code == 200, direct.text
        data = line["response"]["body"]["data"]
        assert data == direct.json()["data"]
        assert all(item["chunking"] == "separate" and item["chunks"] for item in data)
    assert len(lines[0]["response"]["body"]["data"][0]["chunks"]) > 3


async def test_a_batch_without_chunk_output_has_no_chunks_in_its_lines(
    http: httpx.AsyncClient
) -> None:
    [line] = await batch_output(http, [request("a", [STORY], chunk=True)])
    [item] = line["response"]["body"]["data"]
    assert set(item) == {"object", "index", "embedding"}


async def test_usage_counts_the_tokens_of_every_chunk_embedded_separately(
    http: httpx.AsyncClient
) -> None:
    response = await http.post("/v1/embeddings", json={"input": [STORY, "Two words."],
                                                       "prompt": "doc: ", **CHUNKS})
    assert response.status_code == 200, response.text
    body = response.json()
    pieces = [text[c["start"]:c["end"]] for text, item in zip(
        [STORY, "Two words."], body["data"], strict=True) for c in item["chunks"]]
    want = sum(token_count("doc: " + piece) for piece in pieces)  # overlaps count twice
    assert body["usage"] == {"prompt_tokens": want, "total_tokens": want}


async def test_late_chunking_usage_counts_each_windows_tokens_once(fast: Settings) -> None:
    text = STORY[:600]
    counter = tokenizer(DEFAULT_MODEL)
    words = len(counter.encode(text, add_special_tokens=False).ids)
    late = {**CHUNKS, "chunking": "late"}
    embedder = SentenceTransformerEmbedder(Settings(backend="torch", device="cpu"))
    async with running(fast, embedder), serving(fast) as http:
        chunked = (await http.post("/v1/embeddings", json={"input": text, **late})).json()
        pooled = (await http.post("/v1/embeddings", json={"input": text, "chunk": True}))
        long_one = (await http.post("/v1/embeddings", json={
            "input": " ".join([STORY] * 3), "prompt": "doc: ", **late})).json()
    assert len(chunked["data"][0]["chunks"]) > 3 and words < 254  # one window
    assert sum(c["tokens"] for c in chunked["data"][0]["chunks"]) > words  # chunks overlap
    assert chunked["usage"]["prompt_tokens"] == words + 2 == pooled.json()["usage"][
        "prompt_tokens"]
    windows = plan_chunks([" ".join([STORY] * 3)], "doc: ", ChunkSpec(late=True, size=16),
                          overlap=4, model=DEFAULT_MODEL, max_seq_length=256).windows[0]
    assert len(windows) > 1  # each window's tokens, [CLS] and [SEP] and the prompt's too
    assert long_one["usage"]["prompt_tokens"] == sum(len(counter.encode(w.text).ids)
                                                     for w in windows)
