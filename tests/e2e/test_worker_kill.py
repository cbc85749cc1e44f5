"""kill -9 of a worker mid-job: another worker finishes the job, every index exactly once."""

from __future__ import annotations

import csv
from pathlib import Path

import httpx
import pytest

from pipeline.store.embedded import EmbeddedRedis
from tests.support.processes import start_server, start_worker, wait_for_workers, wait_until
from tests.support.sse_client import read_events
from tests.support.sts_data import STS_DIR

STS = STS_DIR

pytestmark = pytest.mark.slow


def test_a_job_survives_kill_9_of_its_worker(tmp_path: Path) -> None:
    with (STS / "sts-train.csv").open(encoding="utf-8") as handle:
        texts = [row[5] for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)]
    texts = texts[:2000]
    env = {"EMBEDSTREAM_VISIBILITY_TIMEOUT_S": "3", "EMBEDSTREAM_HEARTBEAT_TTL_S": "3",
           "EMBEDSTREAM_HEARTBEAT_INTERVAL_S": "0.5"}
    with EmbeddedRedis(tmp_path / "redis", binary="valkey") as redis_server:
        first = start_worker(redis_server.url, tmp_path, "doomed", **env)
        server, base = start_server(redis_server.url, tmp_path)
        second = None
        try:
            wait_for_workers(base, 1)
            reply = httpx.post(f"{base}/v1/jobs", json={"inputs": texts}, timeout=30)
            job_id = reply.json()["id"]

            def started() -> bool:
                return int(httpx.get(f"{base}/v1/jobs/{job_id}").json()["done"]) >= 256
            wait_until(started, 120, "the first results")
            first.kill()
            assert httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] == "running"

            second = start_worker(redis_server.url, tmp_path, "survivor", **env)
            with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events",
                              timeout=httpx.Timeout(10, read=180)) as response:
                events = list(read_events(response))
            indexes = [row["index"] for e in events if e.event == "result" for row in e.data]
            assert sorted(indexes) == list(range(len(texts))), "an index was lost or repeated"
            end = events[-1]
            assert end.event == "end" and end.data["status"] == "completed"
            assert end.data["done"] == len(texts) and end.data["failed"] == 0
            feed = redis_server_feed(redis_server.url)
            assert any(kind == "worker.down" for kind in feed), feed
        finally:
            for process in (second, server, first):
                if process is not None:
                    process.stop()


def redis_server_feed(url: str) -> list[str]:
    """The event types in the live feed (via Redis, the source the SSE feed reads)."""
    import redis

    with redis.Redis.from_url(url) as client:
        def down() -> bool:
            return any(f[b"type"] == b"worker.down" for _, f in client.xrange("es:feed"))
        wait_until(down, 30, "worker.down in the feed")
        return [f[b"type"].decode() for _, f in client.xrange("es:feed")]
