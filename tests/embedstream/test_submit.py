"""`embedstream submit` and `embedstream results` against real processes.

A server and a worker with a fake embedder (a short sleep a model call, so a
3,000-line job takes a few seconds) run for the module on a Valkey of their
own. The commands run in-process through typer's runner, except where a test
kills one: then it is a real `python -m embedstream submit` child. One test
uses the real model and compares with a direct `SentenceTransformer.encode`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from typer.testing import CliRunner

from embedstream.bulk import (
    EXIT_BAD_INPUT,
    EXIT_CANCELLED,
    EXIT_FAILED_INPUTS,
    EXIT_OK,
    EXIT_UNREACHABLE,
)
from embedstream.cli import app
from embedstream.spool import OutputLock
from pipeline.store.embedded import EmbeddedRedis
from tests.support.fakes import expected_vector
from tests.support.processes import (
    ROOT,
    Process,
    start_server,
    start_worker,
    wait_for_workers,
    wait_until,
)
from tests.support.sts_data import STS_DIR

DIMS = 384


@dataclass(frozen=True)
class Stack:
    base: str
    redis_url: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A server and one fake worker (20 ms a model call) on a Valkey of their own."""
    root = tmp_path_factory.mktemp("submit-stack")
    processes: list[Process] = []
    with EmbeddedRedis(root / "redis", binary="valkey") as server:
        try:
            processes.append(start_worker(server.url, root, "fake",
                                          EMBEDSTREAM_BACKEND="tests.support.fakes:SlowEmbedder",
                                          EMBEDSTREAM_CALIBRATE="0",
                                          EMBEDSTREAM_FAKE_DELAY_S="0.02"))
            process, base = start_server(server.url, root)
            processes.append(process)
            wait_for_workers(base, 1)
            yield Stack(base, server.url)
        finally:
            for process in processes:
                process.stop()


def run_cli(*args: str, stdin: str | None = None) -> Any:
    result = CliRunner().invoke(app, list(args), input=stdin, catch_exceptions=False)
    return result


def job_count(redis_url: str) -> int:
    with redis.Redis.from_url(redis_url) as client:
        return sum(1 for _ in client.scan_iter(match="es:{*}:job", count=1000))


def expected(texts: list[str]) -> np.ndarray[Any, Any]:
    return np.vstack([expected_vector(text, DIMS) for text in texts])


def test_a_txt_file_becomes_an_npy_in_input_order_with_ids_beside_it(
    stack: Stack, tmp_path: Path
) -> None:
    texts = [f"line {i} of a text file" for i in range(100)]
    source = tmp_path / "lines.txt"
    source.write_text("\n".join(texts[:50]) + "\n\n" + "\n".join(texts[50:]) + "\n")
    out = tmp_path / "vectors.npy"
    result = run_cli("submit", str(source), "--out", str(out), "--url", stack.base, "-q")
    assert result.exit_code == EXIT_OK, result.output
    np.testing.assert_allclose(np.load(out), expected(texts), rtol=1e-6, atol=1e-6)
    assert (tmp_path / "vectors.ids.txt").read_text().split() == [str(i) for i in range(100)]
    assert not list(tmp_path.glob("vectors.npy.*")), "the spool and state were left behind"


def test_a_jsonl_file_of_objects_and_strings_keeps_its_ids(stack: Stack, tmp_path: Path) -> None:
    rows = [{"id": "a", "text": "first text", "metadata": {"n": 1}}, "second text",
            {"id": "c", "text": "third text"}]
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out.jsonl"
    result = run_cli("submit", str(source), "--out", str(out), "--url", stack.base, "-q")
    assert result.exit_code == EXIT_OK, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["index"], r["truncated"]) for r in lines] == [
        ("a", 0, False), (None, 1, False), ("c", 2, False)]
    texts = ["first text", "second text", "third text"]
    np.testing.assert_allclose([r["embedding"] for r in lines], expected(texts), atol=1e-6)


@pytest.mark.parametrize("kind", ["csv", "tsv"])
def test_a_table_gives_its_text_and_id_columns(stack: Stack, tmp_path: Path, kind: str) -> None:
    sep = "," if kind == "csv" else "\t"
    source = tmp_path / f"table.{kind}"
    source.write_text(sep.join(["key", "body", "lang"]) + "\n" +
                      "".join(f"k{i}{sep}body text {i}{sep}en\n" for i in range(5)))
    out = tmp_path / "table.npy"
    result = run_cli("submit", str(source), "--column", "body", "--id-column", "key",
                     "--out", str(out), "--url", stack.base, "-q")
    assert result.exit_code == EXIT_OK, result.output
    np.testing.assert_allclose(np.load(out), expected([f"body text {i}" for i in range(5)]),
                               atol=1e-6)
    assert (tmp_path / "table.ids.txt").read_text().split() == [f"k{i}" for i in range(5)]


def test_a_missing_column_is_bad_input_naming_the_header(stack: Stack, tmp_path: Path) -> None:
    source = tmp_path / "table.csv"
    source.write_text("a,b\n1,2\n")
    result = run_cli("submit", str(source), "--column", "text", "--url", stack.base, "-q")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "no column 'text'" in result.output and "'a', 'b'" in result.output


def test_stdin_is_read_a_text_a_line(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "stdin.npy"
    texts = ["from standard input", "a second line"]
    result = run_cli("submit", "-", "--out", str(out), "--url", stack.base, "-q",
                     stdin="\n".join(texts) + "\n")
    assert result.exit_code == EXIT_OK, result.output
    np.testing.assert_allclose(np.load(out), expected(texts), atol=1e-6)


def test_no_wait_prints_the_job_id_and_a_rerun_gets_the_same_job(
    stack: Stack, tmp_path: Path
) -> None:
    source = tmp_path / "again.txt"
    source.write_text("submitted twice\nstill one job\n")
    first = run_cli("submit", str(source), "--no-wait", "--url", stack.base, "-q")
    second = run_cli("submit", str(source), "--no-wait", "--url", stack.base, "-q")
    assert first.exit_code == second.exit_code == EXIT_OK
    job_id = first.stdout.strip()
    assert len(job_id) == 32 and second.stdout.strip() == job_id
    other = run_cli("submit", str(source), "--no-wait", "--dimensions", "64",
                    "--url", stack.base, "-q")
    assert other.stdout.strip() != job_id, "other options must make another job"
    out = tmp_path / "fetched.jsonl"
    fetched = run_cli("results", job_id, "--out", str(out), "--url", stack.base, "-q")
    assert fetched.exit_code == EXIT_OK, fetched.output
    assert [json.loads(line)["index"] for line in out.read_text().splitlines()] == [0, 1]



def test_results_without_out_write_jsonl_to_stdout_and_progress_to_stderr_only(
    stack: Stack, tmp_path: Path
) -> None:
    texts = [f"printed text {i}" for i in range(40)]
    source = tmp_path / "printed.txt"
    source.write_text("\n".join(texts) + "\n")
    job_id = run_cli("submit", str(source), "--no-wait", "--url", stack.base,
                     "-q").stdout.strip()
    result = run_cli("results", job_id, "--url", stack.base)
    assert result.exit_code == EXIT_OK, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(line["index"] for line in lines) == list(range(40)), "stdout is JSONL only"
    by_index = sorted(lines, key=lambda line: line["index"])
    np.testing.assert_allclose([line["embedding"] for line in by_index], expected(texts),
                               atol=1e-6)
    assert f"job {job_id} completed: 40 done" in result.stderr
    assert not list(tmp_path.glob("*.state.json")), "nothing is saved without --out"


def test_a_second_run_on_the_same_out_is_refused_naming_the_holder(
    stack: Stack, tmp_path: Path
) -> None:
    source = tmp_path / "locked.txt"
    source.write_text("one\ntwo\n")
    job_id = run_cli("submit", str(source), "--no-wait", "--url", stack.base,
                     "-q").stdout.strip()
    out = tmp_path / "locked.npy"
    with OutputLock(out):  # as a first run still writing it would hold it
        refused = run_cli("results", job_id, "--out", str(out), "--url", stack.base, "-q")
    assert refused.exit_code == EXIT_BAD_INPUT
    assert f"another run is writing {out} (pid {os.getpid()})" in refused.output
    assert not out.exists()
    again = run_cli("results", job_id, "--out", str(out), "--url", stack.base, "-q")
    assert again.exit_code == EXIT_OK, again.output
    assert np.load(out).shape == (2, DIMS)
    assert not list(tmp_path.glob("locked.npy.*")), "the lock file is removed at the end"


def test_results_of_a_cancelled_job_exit_4_with_nan_rows_for_what_was_never_made(
    stack: Stack, tmp_path: Path
) -> None:
    source = tmp_path / "cancel.txt"
    source.write_text("".join(f"to be cancelled {i}\n" for i in range(3000)))
    queued = run_cli("submit", str(source), "--no-wait", "--url", stack.base, "-q")
    job_id = queued.stdout.strip()
    assert httpx.delete(f"{stack.base}/v1/jobs/{job_id}").json()["status"] == "cancelled"
    out = tmp_path / "cancelled.npy"
    result = run_cli("results", job_id, "--out", str(out), "--url", stack.base)
    assert result.exit_code == EXIT_CANCELLED, result.output
    assert "never embedded" in result.output
    matrix = np.load(out)
    made = ~np.isnan(matrix).any(axis=1)
    assert matrix.shape == (3000, DIMS) and made.sum() < 3000
    texts = [f"to be cancelled {i}" for i in np.flatnonzero(made)]
    if texts:  # the worker may have made a few chunks before the cancel
        np.testing.assert_allclose(matrix[made], expected(texts), atol=1e-6)


def test_a_job_with_a_failed_input_exits_3_with_a_nan_row_for_it(
    stack: Stack, tmp_path: Path
) -> None:
    # A model of its own, served by a worker that fails any text containing POISON.
    worker = start_worker(stack.redis_url, tmp_path, "poison", EMBEDSTREAM_MODEL="poison-model",
                          EMBEDSTREAM_BACKEND="tests.support.fakes:PoisonEmbedder",
                          EMBEDSTREAM_CALIBRATE="0")
    try:
        wait_for_workers(stack.base, 2)
        source = tmp_path / "poisoned.txt"
        source.write_text("a good line\nthis one is POISON\nanother good line\n")
        out = tmp_path / "poisoned.npy"
        result = run_cli("submit", str(source), "--out", str(out), "--model", "poison-model",
                         "--url", stack.base, "-q")
    finally:
        worker.stop()
    assert result.exit_code == EXIT_FAILED_INPUTS, result.output
    matrix = np.load(out)
    assert np.isnan(matrix[1]).all() and not np.isnan(matrix[[0, 2]]).any()


def test_an_unreachable_server_exits_5_saying_so(tmp_path: Path) -> None:
    source = tmp_path / "lines.txt"
    source.write_text("nobody listens\n")
    result = run_cli("submit", str(source), "--url", "http://127.0.0.1:9", "--retry-for", "0.5",
                     "-q")
    assert result.exit_code == EXIT_UNREACHABLE
    assert "cannot reach embedstream at http://127.0.0.1:9" in result.output


def test_a_submit_killed_half_way_resumes_with_one_job_and_no_duplicate_row(
    stack: Stack, tmp_path: Path
) -> None:
    texts = [f"bulk text {i} for the kill test" for i in range(3000)]
    source = tmp_path / "bulk.txt"
    source.write_text("\n".join(texts) + "\n")
    out = tmp_path / "bulk.npy"
    state = tmp_path / "bulk.npy.state.json"
    jobs_before = job_count(stack.redis_url)
    args = [sys.executable, "-m", "embedstream", "submit", str(source), "--out", str(out),
            "--url", stack.base, "-q"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(args, env=env, cwd=tmp_path)
    try:
        def half_way() -> bool:
            assert child.poll() is None, "submit finished before it could be killed"
            try:
                return int(json.loads(state.read_text())["rows"]) >= 600
            except (FileNotFoundError, ValueError, KeyError):
                return False
        wait_until(half_way, 60, "the spool to hold 600 rows")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not out.exists()
    again = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, timeout=120)
    assert again.returncode == EXIT_OK, again.stderr.decode()
    assert job_count(stack.redis_url) == jobs_before + 1, "the rerun made a second job"
    np.testing.assert_allclose(np.load(out), expected(texts), atol=1e-6)
    assert not state.exists()


@pytest.mark.slow
# 3,000 lines through the real model, then a direct encode of them: ~40 s on 2 cores.
@pytest.mark.timeout(180)
def test_submit_of_3000_lines_with_the_real_model_equals_a_direct_encode(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from pipeline.model.info import bundled_model_dir

    with (STS_DIR / "sts-train.csv").open(encoding="utf-8") as handle:
        texts = list(dict.fromkeys(line.split("\t")[5] for line in handle))[:3000]
    source = tmp_path / "sts.txt"
    source.write_text("\n".join(texts) + "\n")
    out = tmp_path / "sts.npy"
    with EmbeddedRedis(tmp_path / "redis", binary="valkey") as server:
        worker = start_worker(server.url, tmp_path, "real", EMBEDSTREAM_CALIBRATE="0")
        process, base = start_server(server.url, tmp_path)
        try:
            wait_for_workers(base, 1)
            result = run_cli("submit", str(source), "--out", str(out), "--url", base, "-q")
            assert result.exit_code == EXIT_OK, result.output
        finally:
            process.stop()
            worker.stop()
    direct = SentenceTransformer(str(bundled_model_dir()), device="cpu").encode(
        texts, normalize_embeddings=True)
    got = np.load(out)
    assert got.shape == (3000, DIMS)
    cosines = np.sum(got * direct, axis=1)
    assert cosines.min() > 0.9999, cosines.min()
    assert httpx  # the stack's API was reached through the CLI only
