"""A job survives its primaries failing over, on a real cluster of three primaries, each
with one replica, through real processes.

With a server and two workers running a 4,000-text job, the primary holding
the job's keys is killed with SIGKILL; its replica takes over, the killed
node comes back as a replica, and then the primary holding the queue is
killed the same way. The job must end `completed` with every index exactly
once, both in an SSE stream read throughout (resuming with Last-Event-ID
whenever it drops) and in the results pages, and no process may exit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.keys import Keys
from pipeline.model.info import DEFAULT_MODEL
from tests.support.cluster import ValkeyCluster
from tests.support.processes import (
    Process,
    start_server,
    start_worker,
    wait_for_workers,
    wait_until,
)
from tests.support.sse_client import Reader, results_pages

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEYS = Keys("es")
TOTAL = 4000
WORKER_ENV = {"EMBEDSTREAM_BACKEND": "tests.support.fakes:SlowEmbedder",
              "EMBEDSTREAM_FAKE_DELAY_S": "0.04", "EMBEDSTREAM_BLOCK_MS": "500",
              "EMBEDSTREAM_CALIBRATE": "0", "EMBEDSTREAM_VISIBILITY_TIMEOUT_S": "4",
              "EMBEDSTREAM_HEARTBEAT_TTL_S": "4", "EMBEDSTREAM_HEARTBEAT_INTERVAL_S": "0.5"}


def job_field(base: str, job_id: str, name: str) -> Any:
    """A field of the job's status, or None while the server answers 503."""
    reply = httpx.get(f"{base}/v1/jobs/{job_id}", timeout=10)
    return reply.json()[name] if reply.status_code == 200 else None


def fail_over(cluster: ValkeyCluster, key: str) -> int:
    """SIGKILL the primary serving `key`, wait for its replica to take over, bring the
    killed node back (as a replica) and wait until it is in sync; the killed index."""
    old = cluster.primary_of_key(key)
    cluster.kill(old)
    cluster.wait_failover(key, old)
    cluster.restart(old)
    cluster.wait_in_sync()
    assert cluster.role(old) == "slave"
    return old


def test_a_job_completes_exactly_once_through_two_primary_failovers(
    ha_cluster: ValkeyCluster, tmp_path: Path
) -> None:
    urls = ha_cluster.urls
    processes: list[Process] = []
    try:
        server, base = start_server(urls[0], tmp_path)
        processes.append(server)
        processes += [start_worker(url, tmp_path, name, **WORKER_ENV)
                      for name, url in zip("ab", urls[1:3], strict=True)]
        wait_for_workers(base, 2)
        reply = httpx.post(f"{base}/v1/jobs", timeout=30, json={
            "inputs": [f"failover sentence {i} about the sea" for i in range(TOTAL)]})
        assert reply.status_code == 202, reply.text
        job_id = reply.json()["id"]
        reader = Reader(base, job_id)
        reader.start()

        wait_until(lambda: (job_field(base, job_id, "done") or 0) >= 800, 60, "800 results")
        first = fail_over(ha_cluster, KEYS.job(job_id))
        done_then = job_field(base, job_id, "done") or 0
        wait_until(lambda: (job_field(base, job_id, "done") or 0) > done_then + 200, 60,
                   "progress after the first failover")
        second = fail_over(ha_cluster, KEYS.queue(DEFAULT_MODEL, "bulk"))

        reader.join(timeout=120)
        assert reader.end is not None, "the SSE stream never ended"
        pages = results_pages(base, job_id)
        missing = sorted(set(range(TOTAL)) - set(reader.seen))
        twice = sorted(i for i, n in reader.seen.items() if n > 1)
        assert (reader.end["status"], reader.end["done"], reader.end["failed"], missing,
                twice) == ("completed", TOTAL, 0, [], []), (reader.end, missing, twice,
                                                           sorted(set(range(TOTAL)) - set(pages)))
        assert sorted(pages) == list(range(TOTAL))
        assert max(pages.values()) == 1
        dead = [p.log_path for p in processes if not p.alive()]
        assert dead == [], f"a process exited: see {dead}"
        outages = sum(p.log().count("lost Redis") for p in processes)
        print(f"failed over nodes {first} then {second}; SSE resumed {reader.resumes} times; "
              f"{outages} outages waited out by the workers")
    finally:
        for process in processes:
            process.stop()
