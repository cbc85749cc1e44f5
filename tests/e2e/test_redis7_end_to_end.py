"""The pipeline through real processes on Debian's redis-server 7.0 (the oldest supported)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from pipeline.store.embedded import EmbeddedRedis
from tests.support.processes import start_server, start_worker, wait_for_workers
from tests.support.sse_client import read_events

pytestmark = pytest.mark.slow


def test_a_job_streams_to_the_end_on_redis_7(redis7_server: EmbeddedRedis, tmp_path: Path) -> None:
    worker = start_worker(redis7_server.url, tmp_path, "r7")
    server, base = start_server(redis7_server.url, tmp_path)
    try:
        wait_for_workers(base, 1)
        texts = [f"sentence {i} about the sea" for i in range(100)]
        reply = httpx.post(f"{base}/v1/jobs", json={"inputs": texts, "dimensions": 64})
        assert reply.status_code == 202, reply.text
        job_id = reply.json()["id"]
        with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", timeout=120) as response:
            events = list(read_events(response))
        rows = [row for e in events if e.event == "result" for row in e.data]
        assert sorted(r["index"] for r in rows) == list(range(100))
        assert all(len(r["embedding"]) == 64 for r in rows)
        assert events[-1].event == "end" and events[-1].data["status"] == "completed"
    finally:
        server.stop()
        worker.stop()
