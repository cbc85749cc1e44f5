"""A job survives two primary failovers behind Sentinel (a primary, a replica, three
sentinels: tests/support/sentinel.py), through real processes (the shape is
tests/support/failover.py).

With a server and two workers running a job, the primary is killed with
SIGKILL; the sentinels promote the replica, and the killed node comes back
as a replica of it. Then the new primary is killed the same way, and the
first node, promoted in turn, holds everything: the job must end `completed`
with every index exactly once, both in an SSE stream read throughout
(resuming with Last-Event-ID whenever it drops) and in the results pages,
and no process may exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.store.server_files import find_server_binary
from tests.support.failover import job_through_two_failovers
from tests.support.sentinel import ValkeySentinel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TOTAL = 2000
# The sentinels take 4-5 s to replace a primary (tests/support/sentinel.py), and a worker
# backs off up to 5 s between tries: its leases and heartbeat must outlast that, or its
# chunks are handed out again at each failover, and by the second are given up as poison.
# Slower calls than the cluster test's: a worker takes up its entries as soon as the new
# primary answers, and at 0.04 s a call the two finished the other 1,600 texts (1.2 s)
# while the killed node was still being brought back, before the second failover.
WORKER_TIMINGS = {"EMBEDSTREAM_VISIBILITY_TIMEOUT_S": "15", "EMBEDSTREAM_HEARTBEAT_TTL_S": "15",
                  "EMBEDSTREAM_FAKE_DELAY_S": "0.25"}


@pytest.fixture
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeySentinel]:
    with ValkeySentinel(tmp_path_factory.mktemp("sentinel"),
                        find_server_binary("valkey")) as started:
        yield started


def test_a_job_completes_exactly_once_through_two_sentinel_failovers(
    deployment: ValkeySentinel, tmp_path: Path
) -> None:
    killed: list[int] = []

    def fail_over(_key: str) -> int:
        """SIGKILL the primary (it holds every key), wait for the sentinels to promote
        its replica, and bring the killed node back as a replica of it."""
        old = deployment.kill_primary()
        new = deployment.wait_failover(old)
        deployment.restart(old)
        assert deployment.primary_index() == new
        killed.append(old)
        return old

    url = deployment.url
    print(job_through_two_failovers(url, [url, url], tmp_path, fail_over, total=TOTAL,
                                    **WORKER_TIMINGS))
    assert len(set(killed)) == 2, f"both nodes were to be killed once, not {killed}"
