"""Per-chunk vectors (`chunk_output: "chunks"`) and late chunking.

Late chunking is checked against a reference computed directly with
sentence-transformers on the bundled model (`output_value="token_embeddings"`,
mean over each chunk's tokens); separate chunks against embedding each
chunk's text alone. The surfaces (REST results, SSE, /v1/embeddings) run an
in-process worker with HashEmbedder, whose vector for a text is a hash of
the exact text, so a chunk's vector names the text it was made from.
"""

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest
from mcp import Client

from embedstream.outputs import jsonl_line
from embedstream.protocol import decode_result
from mcp_server.agents import build_mcp
from mcp_server.app import create_app
from pipeline.model.embedder import backend_of
from pipeline.model.info import DEFAULT_MODEL
from pipeline.model.loading import load_embedder
from pipeline.model.spans import ChunkSpec, plan_chunks
from pipeline.model.tokens import tokenizer
from pipeline.model.torch_backend import SentenceTransformerEmbedder
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder, expected_vector
from tests.support.mcp_sessions import call, read_all_results, wait_for_status
from tests.support.rest import assert_error, parse_sse, serving, submit, wait_done
from workers.model_calls import ModelThread
from workers.worker import run_worker

DIMS = 384
STORY = " ".join(
    f"Sentence number {i} tells of {word} rivers and the towns along them. "
    f"Is it true that {word} bridges cross them?"
    for i, word in enumerate(["quiet", "broad", "winding", "frozen", "muddy", "swift", "old",
                              "narrow", "deep", "shallow", "green", "grey"]))


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def embedder() -> Iterator[SentenceTransformerEmbedder]:
    yield SentenceTransformerEmbedder(Settings(backend="torch", device="cpu"))


def plan(texts: list[str], spec: ChunkSpec, overlap: int = 0, prompt: str = "") -> Any:
    return plan_chunks(texts, prompt, spec, overlap=overlap, model=DEFAULT_MODEL,
                       max_seq_length=256)


def reference_late(embedder: SentenceTransformerEmbedder, text: str,
                   spans: list[tuple[int, int]]) -> list[np.ndarray[Any, Any]]:
    """sentence-transformers' token embeddings of `text`, averaged over each span's tokens."""
    model = embedder.model
    tokens = model.encode(text, output_value="token_embeddings", convert_to_numpy=False)
    offsets = model.tokenizer(text, return_offsets_mapping=True, truncation=True,
                              max_length=256)["offset_mapping"]
    matrix = tokens.float().cpu().numpy()
    assert len(offsets) == len(matrix)
    means = []
    for start, end in spans:
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a >= start and b <= end]
        means.append(matrix[inside].mean(axis=0))
    return means


# Where chunks are cut


def test_chunk_offsets_cut_the_input_where_they_say() -> None:
    made = plan([STORY], ChunkSpec(size=32), overlap=8)
    spans = made.spans
    assert len(spans) > 3 and made.sizes == [len(spans)]
    assert spans[0].start == 0 and spans[-1].end == len(STORY)
    counted = tokenizer(DEFAULT_MODEL)
    for span, text in zip(spans, made.texts, strict=True):
        assert text == STORY[span.start:span.end]
        assert len(counted.encode(text, add_special_tokens=False).ids) == span.tokens <= 32
    assert all(b.start < a.end for a, b in itertools.pairwise(spans))  # overlap


def test_sentence_chunks_end_at_sentence_ends_and_fit() -> None:
    made = plan([STORY], ChunkSpec(size=40, sentences=True))
    spans = made.spans
    assert len(spans) > 3
    for span in spans:
        assert STORY[span.end - 1] in ".?" and span.tokens <= 40
        assert span.start == 0 or STORY[span.start - 1] == " "
    assert all(a.end < b.start for a, b in itertools.pairwise(spans))
    sentences = re.findall(r"[^.?]+[.?]", STORY)
    assert " ".join(STORY[s.start:s.end] for s in spans) == " ".join(
        s.strip() for s in sentences)


# Late chunking and separate chunks against sentence-transformers


def test_late_chunks_match_token_embeddings_averaged_over_each_span(
    embedder: SentenceTransformerEmbedder
) -> None:
    text = STORY[:700]
    made = plan([text], ChunkSpec(late=True, size=24), overlap=4)
    assert len(made.windows[0]) == 1  # the text fits one window: one model call
    rows = asyncio.run(ModelThread(embedder).embed_plan(made)).vectors
    expected = reference_late(embedder, text, [(s.start, s.end) for s in made.spans])
    assert len(rows) == len(expected) > 3
    for row, want in zip(rows, expected, strict=True):
        assert cosine(row, want) >= 0.9999


def test_late_chunks_of_a_long_text_see_their_own_window(
    embedder: SentenceTransformerEmbedder
) -> None:
    text = " ".join([STORY] * 2)
    made = plan([text], ChunkSpec(late=True, size=48, sentences=True), prompt="passage: ")
    windows = made.windows[0]
    assert len(windows) > 1
    rows = asyncio.run(ModelThread(embedder).embed_plan(made)).vectors
    for window in windows:
        expected = reference_late(embedder, window.text, [(a, b) for _, a, b in window.rows])
        for (row, _, _), want in zip(window.rows, expected, strict=True):
            assert cosine(rows[row], want) >= 0.9999
    # Late chunks differ from chunks embedded alone: they saw their neighbours.
    alone = embedder.embed(made.texts).vectors
    assert min(cosine(a, b) for a, b in zip(rows, alone, strict=True)) < 0.99


def test_the_onnx_backend_late_chunks_like_sentence_transformers(
    embedder: SentenceTransformerEmbedder, tmp_path_factory: pytest.TempPathFactory
) -> None:
    shared = os.environ.get("EMBEDSTREAM_EXPORT_DIR")
    export_dir = Path(shared) if shared else tmp_path_factory.mktemp("exports")
    onnx = load_embedder(Settings(backend="onnx", device="cpu", export_dir=export_dir))
    assert backend_of(onnx) == "onnx"
    text = STORY[:700]
    made = plan([text], ChunkSpec(late=True, size=24), overlap=4)
    rows = asyncio.run(ModelThread(onnx).embed_plan(made)).vectors
    expected = reference_late(embedder, text, [(s.start, s.end) for s in made.spans])
    for row, want in zip(rows, expected, strict=True):
        assert cosine(row, want) >= 0.9999


def test_separate_chunks_equal_each_chunk_embedded_alone(
    embedder: SentenceTransformerEmbedder
) -> None:
    made = plan([STORY], ChunkSpec(size=40), overlap=8)
    rows = asyncio.run(ModelThread(embedder).embed_plan(made)).vectors
    for span, row in zip(made.spans, rows, strict=True):
        alone = embedder.model.encode(STORY[span.start:span.end])
        assert cosine(row, alone) >= 0.9999


# Through the surfaces


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(block_ms=100, chunk_size=4, fast_lane_max_texts=4,
                            batch_max_texts=64, heartbeat_interval_s=0.2, heartbeat_ttl_s=2.0)


@contextlib.asynccontextmanager
async def worker_running(settings: Settings, embedder: Any = None) -> AsyncIterator[None]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_worker(settings, embedder or HashEmbedder(settings), stop,
                                          ready))
    with anyio.fail_after(10):
        await ready.wait()
    try:
        yield
    finally:
        stop.set()
        with anyio.fail_after(10):
            await task


@pytest.fixture
async def client(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(api_settings, with_mcp=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with (worker_running(api_settings),
                    httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http):
            yield http


def assert_chunks_of(text: str, row: dict[str, Any], prompt: str = "",
                     dims: int | None = None) -> None:
    """Each chunk's offsets cut `text`, and its vector is the fake's for that cut, shaped."""
    assert row["chunking"] == "separate" and len(row["chunks"]) >= 1
    for chunk in row["chunks"]:
        piece = text[chunk["start"]:chunk["end"]]
        want = expected_vector(prompt + piece, DIMS, output_dimensions=dims)
        assert chunk["embedding"] == pytest.approx(want.tolist(), abs=1e-6)


@pytest.mark.anyio
async def test_rest_results_and_sse_carry_each_inputs_chunks(client: httpx.AsyncClient) -> None:
    texts = [STORY, "A short one."]
    job_id = await submit(client, texts, chunk=True, chunk_output="chunks", chunk_tokens=32,
                          chunk_overlap=0, dimensions=64, prompt="p: ")
    assert (await wait_done(client, job_id))["status"] == "completed"
    rows = (await client.get(f"/v1/jobs/{job_id}/results")).json()["results"]
    assert len(rows[0]["chunks"]) > 3 and len(rows[1]["chunks"]) == 1
    for text, row in zip(texts, rows, strict=True):
        assert len(row["embedding"]) == 64
        assert_chunks_of(text, row, "p: ", 64)
    stream = await client.get(f"/v1/jobs/{job_id}/events")
    streamed = sorted((row for e in parse_sse(stream.text) if e["event"] == "result"
                       for row in e["data"]), key=lambda row: row["index"])
    assert [r["chunks"] for r in streamed] == [r["chunks"] for r in rows]


@pytest.mark.anyio
async def test_v1_embeddings_items_carry_their_chunks(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/embeddings", json={
        "input": [STORY], "chunk": True, "chunk_output": "chunks",
        "chunk_boundary": "sentence", "chunk_tokens": 40})
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    assert_chunks_of(STORY, item)
    assert all(STORY[c["end"] - 1] in ".?" for c in item["chunks"])


@pytest.mark.anyio
async def test_late_chunking_on_a_backend_without_token_embeddings_fails_the_input(
    client: httpx.AsyncClient
) -> None:
    job_id = await submit(client, [STORY], chunk=True, chunk_output="chunks", chunking="late")
    assert (await wait_done(client, job_id))["status"] == "failed"
    row = (await client.get(f"/v1/jobs/{job_id}/results")).json()["results"][0]
    assert row["embedding"] is None and "chunking=late" in row["error"]


@pytest.mark.anyio
@pytest.mark.parametrize(("options", "words"), [
    ({"chunk_output": "pieces"}, ("'chunk_output'", "pooled, chunks")),
    ({"chunking": "early"}, ("'chunking'", "separate, late")),
    ({"chunk_boundary": "para"}, ("'chunk_boundary'", "tokens, sentence")),
    ({"chunk_tokens": 300}, ("'chunk_tokens'", "254")),
    ({"chunk_tokens": 4}, ("'chunk_tokens'", "at least 8")),
    ({"chunk_tokens": 16, "chunk_overlap": 32}, ("'chunk_overlap'", "0 to 12")),
])
async def test_bad_chunk_options_are_refused_naming_the_field(
    client: httpx.AsyncClient, options: dict[str, Any], words: tuple[str, ...]
) -> None:
    body = {"inputs": ["a"], "chunk": True, "chunk_output": "chunks", **options}
    response = await client.post("/v1/jobs", json=body)
    assert_error(response, 422, "invalid_input", *words)


@pytest.mark.anyio
async def test_chunk_options_without_chunk_are_refused(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"inputs": ["a"], "chunking": "late"})
    assert_error(response, 422, "invalid_input", "'chunking'", "'chunk': true")
    response = await client.post("/v1/embeddings", json={"input": "a", "chunk_output": "chunks"})
    assert_error(response, 422, "invalid_input", "'chunk_output'", "'chunk': true")
    response = await client.post("/v1/jobs", json={"inputs": ["a"], "chunk": True,
                                                   "chunking": "late"})
    assert_error(response, 422, "invalid_input", "'chunking'", "'chunk_output': 'chunks'")


def test_the_client_decodes_each_chunks_vector() -> None:
    vector = np.arange(4, dtype="<f4")
    raw = base64.b64encode(vector.tobytes()).decode()
    result = decode_result({"index": 0, "id": "a", "embedding": raw, "truncated": False,
                            "chunking": "late",
                            "chunks": [{"start": 0, "end": 3, "tokens": 1, "embedding": raw}]})
    [chunk] = result.chunks or ()
    assert (chunk.start, chunk.end, chunk.tokens) == (0, 3, 1)
    assert np.array_equal(chunk.embedding, vector) and result.chunking == "late"
    line = json.loads(jsonl_line(result))
    assert line["chunks"][0]["embedding"] == vector.tolist()  # as `--out x.jsonl` writes it


@pytest.mark.anyio
async def test_mcp_embed_submit_job_and_job_results_carry_chunks(settings: Settings) -> None:
    settings = settings.replace(block_ms=100)
    pipeline = Pipeline(settings)
    try:
        async with worker_running(settings), Client(build_mcp(settings, pipeline)) as mcp:
            options = {"chunk": True, "chunk_output": "chunks", "chunk_tokens": 32,
                       "chunk_overlap": 0}
            embedded = await call(mcp, "embed", inputs=[STORY], **options)
            assert embedded["chunking"] == "separate"
            assert_chunks_of(STORY, {"chunking": "separate", "chunks": embedded["chunks"][0]})
            handle = await call(mcp, "submit_job", inputs=[STORY], **options)
            await wait_for_status(mcp, handle["job_id"], "completed", 10)
            [row] = await read_all_results(mcp, handle["job_id"], limit=5)
            assert row["chunks"] == embedded["chunks"][0]
    finally:
        await pipeline.close()


@pytest.mark.anyio
async def test_late_chunks_through_rest_match_the_reference(
    api_settings: Settings, embedder: SentenceTransformerEmbedder
) -> None:
    text = STORY[:700]
    async with worker_running(api_settings, embedder), serving(api_settings) as http:
        job_id = await submit(http, [text], chunk=True, chunk_output="chunks", chunking="late",
                              chunk_tokens=24, chunk_overlap=4, dimensions=128)
        assert (await wait_done(http, job_id))["status"] == "completed"
        [row] = (await http.get(f"/v1/jobs/{job_id}/results")).json()["results"]
    assert row["chunking"] == "late" and len(row["chunks"]) > 3
    spans = [(c["start"], c["end"]) for c in row["chunks"]]
    for chunk, want in zip(row["chunks"], reference_late(embedder, text, spans), strict=True):
        assert len(chunk["embedding"]) == 128
        assert np.linalg.norm(chunk["embedding"]) == pytest.approx(1.0, abs=1e-5)
        assert cosine(chunk["embedding"], want[:128]) >= 0.9999
