"""kill -9 of `embedstream serve` in the middle of a 12,000-line NDJSON upload, then a retry.

The retry carries the same Idempotency-Key to a server started afresh: it
waits out the dead upload's lease (409 meanwhile), then gets a job that a
worker (the fake embedder, for speed) completes with every index exactly
once; nothing the dead upload wrote is left without a TTL.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import redis

from pipeline.keys import Keys
from pipeline.store.embedded import EmbeddedRedis
from tests.support.processes import (
    Process,
    start_server,
    start_worker,
    wait_for_workers,
    wait_until,
)

pytestmark = pytest.mark.slow

LINES = 12_000
KEY = "upload-12000"
KEYS = Keys("es")
ENV = {"EMBEDSTREAM_BACKEND": "tests.support.fakes:HashEmbedder", "EMBEDSTREAM_CALIBRATE": "0",
       "EMBEDSTREAM_IDEMPOTENCY_LEASE_S": "1", "EMBEDSTREAM_STAGING_TTL_S": "30"}
HEADERS = {"content-type": "application/x-ndjson", "idempotency-key": KEY}


def lines(kill_at: int | None = None, server: Process | None = None,
          redis_url: str = "") -> Iterator[bytes]:
    """The upload, one text a line; kills the server once part of it reached Redis."""
    for i in range(LINES):
        if i == kill_at and server is not None:
            wait_until(lambda: staged_chunks(redis_url) >= 20, 60, "the upload to reach Redis")
            server.kill()
        yield orjson.dumps(f"line number {i} of the upload") + b"\n"


def staged_chunks(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return sum(int(client.hlen(key)) for key in client.scan_iter("es:{*}:inputs"))


def test_a_retry_after_kill_9_of_the_server_mid_upload_gets_a_job_that_completes(
    tmp_path: Path,
) -> None:
    with EmbeddedRedis(tmp_path / "redis", binary="valkey") as server_redis:
        url = server_redis.url
        worker = start_worker(url, tmp_path, "fake", **ENV)
        first, base = start_server(url, tmp_path, **ENV)
        second = None
        try:
            wait_for_workers(base, 1)
            with pytest.raises(httpx.HTTPError):
                httpx.post(f"{base}/v1/jobs", content=lines(6_000, first, url),
                           headers=HEADERS, timeout=60)
            assert not first.alive()
            with redis.Redis.from_url(url) as client:
                assert not list(client.scan_iter("es:{*}:job")) or all(
                    client.hget(k, "status") == b"staged" for k in client.scan_iter("es:{*}:job"))
            second, base = start_server(url, tmp_path, **ENV)
            deadline = time.monotonic() + 30
            while True:
                reply = httpx.post(f"{base}/v1/jobs", content=lines(), headers=HEADERS,
                                   timeout=120)
                if reply.status_code != 409 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert reply.status_code == 202, reply.text
            job_id = reply.json()["id"]

            def finished() -> bool:
                return httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] in (
                    "completed", "failed", "cancelled")
            wait_until(finished, 180, "the retried job to finish")
            job = httpx.get(f"{base}/v1/jobs/{job_id}").json()
            assert (job["status"], job["done"], job["failed"]) == ("completed", LINES, 0)
            indexes: list[int] = []
            cursor = ""
            while cursor is not None:
                page = httpx.get(f"{base}/v1/jobs/{job_id}/results",
                                 params={"cursor": cursor, "limit": 1000,
                                         "encoding": "base64"}).json()
                indexes += [row["index"] for row in page["results"]]
                cursor = page["next_cursor"]
            assert sorted(indexes) == list(range(LINES)), "an index was lost or repeated"
            with redis.Redis.from_url(url) as client:
                job_keys = [k for k in client.scan_iter("es:{*") if not k.startswith(b"es:{q:")]
                assert job_keys
                for key in job_keys:  # the dead upload's too (queue streams are shared)
                    assert client.ttl(key) > 0, key
        finally:
            for process in (second, first, worker):
                if process is not None:
                    process.stop()
