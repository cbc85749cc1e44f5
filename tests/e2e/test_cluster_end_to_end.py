"""The pipeline on a real three-primary Valkey cluster, through real processes.

A server started on one node's URL and workers on the others' (any node
will do) run a job end to end, survive kill -9 of a worker mid-job, and
serve an SSE stream that resumes with Last-Event-ID; jobs' keys land on
more than one node. The workers use the fake embedder: the cluster, not the
vectors, is what is tested (its vectors are still checked exactly).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from pipeline.keys import GROUP, Keys
from pipeline.store.connections import connect_sync
from tests.support.cluster import ValkeyCluster
from tests.support.fakes import expected_vector
from tests.support.processes import (
    Process,
    start_server,
    start_worker,
    wait_for_workers,
    wait_until,
)
from tests.support.sse_client import read_events

pytestmark = pytest.mark.slow

KEYS = Keys("es")
DIMS = 384  # the fakes report the default model's real shape
# Short blocking reads, so a worker told to stop exits within half a second;
# no start-up calibration (int8/uint8 ranges), which these jobs never read.
WORKER_ENV = {"EMBEDSTREAM_BACKEND": "tests.support.fakes:HashEmbedder",
              "EMBEDSTREAM_BLOCK_MS": "500", "EMBEDSTREAM_CALIBRATE": "0"}
FAST_TIMINGS = {**WORKER_ENV, "EMBEDSTREAM_VISIBILITY_TIMEOUT_S": "3",
                "EMBEDSTREAM_HEARTBEAT_TTL_S": "3", "EMBEDSTREAM_HEARTBEAT_INTERVAL_S": "0.5"}
# The kill test's model: no worker of the module serves it, so only its own workers run it.
KILL_MODEL = "cluster-kill-test-model"


@pytest.fixture(scope="module")
def stack(valkey_cluster: ValkeyCluster,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A server on the first node, two workers on the others; yields (base URL, log dir)."""
    valkey_cluster.flush()
    root = tmp_path_factory.mktemp("cluster-stack")
    started = [start_worker(url, root, name, **WORKER_ENV)
               for name, url in zip("ab", valkey_cluster.urls[1:], strict=True)]
    try:
        server, base = start_server(valkey_cluster.urls[0], root)
        started.append(server)
        wait_for_workers(base, 2)
        yield base, root
    finally:
        for process in started:
            process.stop()


@pytest.fixture
def workers() -> Iterator[list[Process]]:
    """Extra workers a test starts; all stopped when it ends."""
    started: list[Process] = []
    yield started
    for process in started:
        process.stop()


def add_worker(workers: list[Process], url: str, log_dir: Path, name: str,
               **env: str) -> Process:
    process = start_worker(url, log_dir, name, **env)
    workers.append(process)
    return process


def texts_for(label: str, n: int) -> list[str]:
    return [f"{label} sentence number {i} about the weather" for i in range(n)]


def submit(base: str, texts: list[str]) -> str:
    reply = httpx.post(f"{base}/v1/jobs", json={"inputs": texts}, timeout=30)
    assert reply.status_code == 202, reply.text
    return str(reply.json()["id"])


def stream(base: str, job_id: str, after: str | None = None, stop_after: int | None = None,
           ) -> tuple[dict[int, Any], dict[str, Any] | None, str | None]:
    """(rows by index, end data, last event id); asserts no index comes twice."""
    rows: dict[int, Any] = {}
    end = None
    last_id = None
    headers = {"Last-Event-ID": after} if after else {}
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers=headers,
                      timeout=httpx.Timeout(10, read=120)) as response:
        assert response.status_code == 200
        for event in read_events(response):
            last_id = event.id
            if event.event == "result":
                for row in event.data:
                    assert row["index"] not in rows, f"index {row['index']} delivered twice"
                    rows[row["index"]] = row["embedding"]
                if stop_after is not None and len(rows) >= stop_after:
                    break
            elif event.event == "end":
                end = event.data
    return rows, end, last_id


def test_a_job_runs_end_to_end_on_the_cluster_with_jobs_spread_over_its_nodes(
    valkey_cluster: ValkeyCluster, stack: tuple[str, Path]
) -> None:
    base, _ = stack
    texts = texts_for("main", 700)
    job_id = submit(base, texts)
    rows, end, _ = stream(base, job_id)
    assert end is not None and end["status"] == "completed" and end["done"] == len(texts)
    assert sorted(rows) == list(range(len(texts)))
    for i in (0, 350, 699):  # the fakes' vectors, exactly
        assert np.allclose(rows[i], expected_vector(texts[i], DIMS), atol=1e-6)

    small = [submit(base, texts_for(f"small {n}", 3)) for n in range(8)]
    homes = {valkey_cluster.node_of_key(KEYS.job(j)) for j in [job_id, *small]}
    assert len(homes) >= 2, "every job landed on one node"
    for j in small:
        with valkey_cluster.node(valkey_cluster.node_of_key(KEYS.job(j))) as node:
            assert node.exists(KEYS.job(j), KEYS.inputs(j)) == 2
    # The job list reads one index and then the records on every node.
    listed = httpx.get(f"{base}/v1/jobs", params={"limit": 50}, timeout=10)
    assert listed.status_code == 200, listed.text
    assert {job_id, *small} <= {job["id"] for job in listed.json()["jobs"]}


def test_an_sse_stream_resumes_with_last_event_id_on_the_cluster(
    stack: tuple[str, Path]
) -> None:
    base, _ = stack
    texts = texts_for("resume", 1500)
    job_id = submit(base, texts)
    before, end, last_id = stream(base, job_id, stop_after=200)
    assert end is None and last_id is not None
    after, end, _ = stream(base, job_id, after=last_id)
    assert end is not None and end["status"] == "completed"
    assert not set(before) & set(after), "the resumed stream repeated results"
    assert sorted({*before, *after}) == list(range(len(texts)))


def test_a_job_on_the_cluster_survives_kill_9_of_its_worker(
    valkey_cluster: ValkeyCluster, stack: tuple[str, Path], workers: list[Process]
) -> None:
    base, root = stack
    doomed = add_worker(workers, valkey_cluster.urls[1], root, "doomed",
                        **{**FAST_TIMINGS,
                           "EMBEDSTREAM_BACKEND": "tests.support.fakes:SlowEmbedder",
                           "EMBEDSTREAM_FAKE_DELAY_S": "0.5", "EMBEDSTREAM_MODEL": KILL_MODEL})
    wait_for_workers(base, 3)
    texts = texts_for("kill", 2000)
    reply = httpx.post(f"{base}/v1/jobs", json={"inputs": texts, "model": KILL_MODEL},
                       timeout=30)
    assert reply.status_code == 202, reply.text
    job_id = reply.json()["id"]
    # One bulk partition per primary: the worker may hold entries of any of them.
    bulks = KEYS.layout(KILL_MODEL, valkey_cluster.size).bulks

    def started() -> bool:
        return int(httpx.get(f"{base}/v1/jobs/{job_id}", timeout=5).json()["done"]) >= 128
    wait_until(started, 60, "the first results")
    doomed.kill()
    with connect_sync(valkey_cluster.url) as client:
        consumers = [c for bulk in bulks for c in client.xpending(bulk, GROUP)["consumers"]]
    # A worker's consumer name is host-pid-random.
    held = sum(int(c["pending"]) for c in consumers
               if f"-{doomed.popen.pid}-" in c["name"].decode())
    assert held > 0, "the killed worker held no entries: nothing was tested"
    assert httpx.get(f"{base}/v1/jobs/{job_id}", timeout=5).json()["status"] == "running"

    add_worker(workers, valkey_cluster.urls[2], root, "survivor",
               **{**FAST_TIMINGS, "EMBEDSTREAM_MODEL": KILL_MODEL})
    rows, end, _ = stream(base, job_id)
    assert end is not None and end["status"] == "completed"
    assert end["done"] == len(texts) and end["failed"] == 0
    assert sorted(rows) == list(range(len(texts))), "an index was lost"
