"""`embedstream submit --chunk-output chunks --out`: each input's chunks in the output files.

A server and a worker with a fake embedder (a short sleep a model call) run
as real processes for the module on a Valkey of their own; the fake's vector
for a text is a hash of the text, so a chunk's vector names the characters it
was made from. Commands run in-process through typer's runner, except the one
a test kills: a real `python -m embedstream submit` child. The spool's own
resume (rows spooled after the state was last saved) is checked directly.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from embedstream import Chunk, Result
from embedstream.bulk import EXIT_OK
from embedstream.cli import app
from embedstream.spool import Spool, State
from pipeline.store.embedded import EmbeddedRedis
from tests.support.fakes import expected_vector, raw_vector
from tests.support.processes import (
    ROOT,
    Process,
    start_server,
    start_worker,
    wait_for_workers,
    wait_until,
)

DIMS = 384
CHUNKS = ["--chunk", "--chunk-output", "chunks", "--chunk-tokens", "8", "--chunk-overlap", "2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server and one fake worker (20 ms a model call) on a Valkey of their own."""
    root = tmp_path_factory.mktemp("chunks-stack")
    processes: list[Process] = []
    with EmbeddedRedis(root / "redis", binary="valkey") as server:
        try:
            processes.append(start_worker(server.url, root, "fake",
                                          EMBEDSTREAM_BACKEND="tests.support.fakes:SlowEmbedder",
                                          EMBEDSTREAM_CALIBRATE="0",
                                          EMBEDSTREAM_FAKE_DELAY_S="0.02"))
            process, url = start_server(server.url, root)
            processes.append(process)
            wait_for_workers(url, 1)
            yield url
        finally:
            for process in processes:
                process.stop()


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def text_of(i: int) -> str:
    return f"Document {i} starts here. It goes on about rivers, bridges and the towns near them."


def assert_chunk(text: str, start: int, end: int, tokens: int, vector: Any) -> None:
    """The chunk cuts `text` where it says, and its vector is the fake's for that cut."""
    assert 0 <= start < end <= len(text) and 1 <= tokens <= 8
    np.testing.assert_allclose(vector, expected_vector(text[start:end], DIMS), atol=1e-6)


def test_a_jsonl_out_carries_each_inputs_chunks_and_how_they_were_made(
    base: str, tmp_path: Path
) -> None:
    rows = [{"id": f"doc-{i}", "text": text_of(i)} for i in range(5)]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out.jsonl"
    result = run_cli("submit", str(source), "--out", str(out), *CHUNKS, "--url", base, "-q")
    assert result.exit_code == EXIT_OK, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == [row["id"] for row in rows]
    for row, line in zip(rows, lines, strict=True):
        assert line["chunking"] == "separate" and len(line["embedding"]) == DIMS
        chunks = line["chunks"]
        assert len(chunks) > 2 and chunks[0]["start"] == 0
        assert chunks[-1]["end"] == len(row["text"])
        for chunk in chunks:
            assert_chunk(row["text"], chunk["start"], chunk["end"], chunk["tokens"],
                         chunk["embedding"])


def test_an_npy_out_writes_a_row_a_chunk_and_a_sidecar_to_join_on(
    base: str, tmp_path: Path
) -> None:
    texts = [text_of(i) for i in range(40)]
    source = tmp_path / "lines.txt"
    source.write_text("\n".join(texts) + "\n")
    out = tmp_path / "vectors.npy"
    result = run_cli("submit", str(source), "--out", str(out), *CHUNKS, "--chunking",
                     "separate", "--url", base, "-q")
    assert result.exit_code == EXIT_OK, result.output
    assert np.load(out).shape == (40, DIMS)
    assert (tmp_path / "vectors.ids.txt").read_text().split() == [str(i) for i in range(40)]
    assert_chunk_files(tmp_path / "vectors", texts)
    assert not list(tmp_path.glob("vectors.npy.*")), "the spool and state were left behind"


def pooled(texts: list[str], spans: list[dict[str, Any]]) -> np.ndarray[Any, Any]:
    """Each input's vector: its chunks' raw vectors weighted by their tokens, normalized."""
    rows = np.zeros((len(texts), DIMS))
    for span in spans:
        piece = texts[span["index"]][span["start"]:span["end"]]
        rows[span["index"]] += span["tokens"] * raw_vector(piece, DIMS)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def assert_chunk_files(stem: Path, texts: list[str]) -> list[dict[str, Any]]:
    """`.chunks.npy` holds every input's chunks in order, once, each named by its line."""
    matrix = np.load(stem.with_suffix(".chunks.npy"))
    spans = [json.loads(line) for line in stem.with_suffix(".chunks.jsonl").read_text()
             .splitlines()]
    assert matrix.shape == (len(spans), DIMS) and matrix.dtype == np.float32
    assert [s["index"] for s in spans] == sorted(s["index"] for s in spans)
    assert {s["index"] for s in spans} == set(range(len(texts)))
    for row, span in zip(matrix, spans, strict=True):
        assert span["chunking"] == "separate" and span["id"] is None
        assert_chunk(texts[span["index"]], span["start"], span["end"], span["tokens"], row)
    for index in range(len(texts)):  # each input's chunks follow one another, none twice
        mine = [(s["start"], s["end"]) for s in spans if s["index"] == index]
        assert mine[0][0] == 0 and mine[-1][1] == len(texts[index])
        assert all(a[0] < b[0] for a, b in itertools.pairwise(mine))
    return spans


def test_results_without_out_print_the_chunks_on_stdout(base: str, tmp_path: Path) -> None:
    source = tmp_path / "one.txt"
    source.write_text(text_of(7) + "\n")
    queued = run_cli("submit", str(source), *CHUNKS, "--no-wait", "--url", base, "-q")
    assert queued.exit_code == EXIT_OK, queued.output
    job_id = queued.stdout.strip()
    result = run_cli("results", job_id, "--url", base, "-q")
    assert result.exit_code == EXIT_OK, result.output
    [line] = [json.loads(x) for x in result.stdout.splitlines()]
    assert line["chunking"] == "separate" and len(line["chunks"]) > 2
    for chunk in line["chunks"]:
        assert_chunk(text_of(7), chunk["start"], chunk["end"], chunk["tokens"],
                     chunk["embedding"])


def test_a_chunked_submit_killed_half_way_resumes_with_each_chunk_once(
    base: str, tmp_path: Path
) -> None:
    texts = [text_of(i) for i in range(1500)]
    source = tmp_path / "bulk.txt"
    source.write_text("\n".join(texts) + "\n")
    out = tmp_path / "bulk.npy"
    state = tmp_path / "bulk.npy.state.json"
    args = [sys.executable, "-m", "embedstream", "submit", str(source), "--out", str(out),
            *CHUNKS, "--url", base, "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(args, env=env, cwd=tmp_path)
    try:
        def half_way() -> bool:
            assert child.poll() is None, "submit finished before it could be killed"
            try:
                return int(json.loads(state.read_text())["chunk_rows"]) >= 600
            except (FileNotFoundError, ValueError, KeyError):
                return False
        wait_until(half_way, 60, "the spool to hold 600 chunks")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not out.exists()
    again = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, timeout=120)
    assert again.returncode == EXIT_OK, again.stderr.decode()
    spans = assert_chunk_files(tmp_path / "bulk", texts)
    np.testing.assert_allclose(np.load(out), pooled(texts, spans), atol=1e-6)
    assert not state.exists()


def chunked_result(index: int, text: str) -> Result:
    """A result as the client decodes it: two chunks, the fake's vectors."""
    halves = [(0, len(text) // 2), (len(text) // 2, len(text))]
    chunks = tuple(Chunk(a, b, 3, expected_vector(text[a:b], DIMS)) for a, b in halves)
    return Result(index, f"id-{index}", expected_vector(text, DIMS), chunks=chunks,
                  chunking="late")


def test_chunks_spooled_after_the_last_saved_state_are_cut_back_and_written_once(
    tmp_path: Path
) -> None:
    texts = [text_of(i) for i in range(6)]
    results = [chunked_result(i, text) for i, text in enumerate(texts[:5])]
    results.append(Result(5, "id-5", None, error="the model failed", chunks=(),
                          chunking="late"))
    out = tmp_path / "cut.npy"
    spool = Spool(out)
    state = State("key", job_id="job", dims=DIMS, total=6)
    spool.open(state)
    spool.append(state, results[:2], "1-0")
    saved = State(**vars(state))
    spool.append(state, results[2:4], "2-0")  # the run dies before this state is saved:
    spool.save(saved)
    spool.close()
    again = Spool(out)
    resumed = again.load("key")
    assert resumed is not None and (resumed.rows, resumed.chunk_rows) == (2, 4)
    again.open(resumed)
    again.append(resumed, results[2:], "3-0")  # the stream after "1-0" brings them again
    assert again.finish(resumed, 6) == 0
    inputs = np.load(out)
    np.testing.assert_allclose(inputs[:5], np.vstack([r.embedding for r in results[:5]]))
    assert np.isnan(inputs[5]).all()  # the failed input: a NaN row, and no chunks
    spans = [json.loads(line) for line in (tmp_path / "cut.chunks.jsonl").read_text()
             .splitlines()]
    assert [(s["index"], s["id"], s["chunking"]) for s in spans] == [
        (i, f"id-{i}", "late") for i in range(5) for _ in range(2)]
    want = np.vstack([c.embedding for r in results for c in r.chunks or ()])
    np.testing.assert_allclose(np.load(tmp_path / "cut.chunks.npy"), want)
