"""`embedstream up`: embedded Redis, a worker and the server from one command."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import pytest

from tests.support.processes import Process, free_port, wait_for_http, wait_for_workers, wait_until
from tests.support.sse_client import read_events

pytestmark = pytest.mark.slow


def start_up(data_dir: Path, log: Path, log_level: str = "warning",
             **extra_env: str) -> tuple[Process, str]:
    port = free_port()
    env = {"EMBEDSTREAM_REDIS_URL": "", "EMBEDSTREAM_DATA_DIR": str(data_dir), **extra_env}
    process = Process(["up", "--port", str(port), "--workers", "1", "--log-level", log_level],
                      log, env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(process, f"{base}/healthz", 90)
        wait_for_workers(base, 1)
    except BaseException:
        process.stop()
        raise
    return process, base


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_runs_the_pipeline_and_a_second_up_finds_the_first_ones_jobs(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    process, base = start_up(data_dir, tmp_path / "up-1.log")
    try:
        assert f"{base}/v1/jobs" in process.log()
        wait_until(lambda: "ready:     1 worker(s) up" in process.log(), 30, "the ready line")
        embedded = json.loads((data_dir / "embedded.json").read_text())
        reply = httpx.post(f"{base}/v1/jobs", json={"inputs": ["a cat", "a dog", "a car"]})
        assert reply.status_code == 202
        job_id = reply.json()["id"]
        with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", timeout=60) as response:
            events = list(read_events(response))
        assert [e.event for e in events][-1] == "end"
        assert events[-1].data["status"] == "completed"
        assert sum(len(e.data) for e in events if e.event == "result") == 3
    finally:
        code = process.stop(signal.SIGINT, timeout_s=60)
    assert code == 0, process.log()[-2000:]
    assert not pid_alive(int(embedded["pid"])), "Ctrl-C left the embedded server running"
    assert not (data_dir / "embedded.json").exists()

    again, base = start_up(data_dir, tmp_path / "up-2.log")
    try:
        job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
        assert job["status"] == "completed" and job["done"] == 3
        page = httpx.get(f"{base}/v1/jobs/{job_id}/results").json()
        assert [r["index"] for r in page["results"]] == [0, 1, 2]
        assert len(page["results"][0]["embedding"]) == 384
    finally:
        assert again.stop(signal.SIGINT, timeout_s=60) == 0


def start_fake_up(data_dir: Path, log: Path) -> tuple[Process, str]:
    """`up` with the fake embedder, on a data dir that may already have a running `up`."""
    return start_up(data_dir, log, "info", EMBEDSTREAM_BACKEND="tests.support.fakes:HashEmbedder",
                    EMBEDSTREAM_CALIBRATE="0")


def completed(base: str, texts: list[str]) -> dict[str, object]:
    """Submit `texts` and follow the job to its end; the end event's data."""
    reply = httpx.post(f"{base}/v1/jobs", json={"inputs": texts}, timeout=30)
    assert reply.status_code == 202, reply.text
    with httpx.stream("GET", f"{base}/v1/jobs/{reply.json()['id']}/events",
                      timeout=60) as response:
        events = list(read_events(response))
    assert events[-1].event == "end"
    data: dict[str, object] = events[-1].data
    return data


def test_a_second_up_keeps_working_after_the_first_exits(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first, _ = start_fake_up(data_dir, tmp_path / "up-1.log")
    second = None
    try:
        second, base = start_fake_up(data_dir, tmp_path / "up-2.log")
        before = completed(base, ["one", "two", "three"])
        assert before["status"] == "completed"
        assert first.stop(signal.SIGINT, timeout_s=60) == 0, first.log()[-2000:]

        statuses: list[int] = []

        def answers() -> bool:
            try:
                reply = httpx.get(f"{base}/v1/jobs/{before['id']}", timeout=5)
            except httpx.HTTPError:
                return False
            statuses.append(reply.status_code)
            return reply.status_code == 200

        wait_until(answers, 30, "the second up to serve the job again")
        assert set(statuses) <= {200, 503}, statuses  # never a 500 while Redis moves
        # The keeper logs once its server answers, so the log can trail the first 200.
        wait_until(lambda: "serving unix://" in second.log(), 10, "the keeper's log line")
        wait_for_workers(base, 1)
        after = completed(base, ["four", "five"])
        assert after["status"] == "completed" and after["done"] == 2
        state = json.loads((data_dir / "embedded.json").read_text())
        assert pid_alive(int(state["pid"]))
    finally:
        first.stop()
        if second is not None:
            assert second.stop(signal.SIGINT, timeout_s=60) == 0, second.log()[-2000:]
    assert not (data_dir / "embedded.json").exists()
