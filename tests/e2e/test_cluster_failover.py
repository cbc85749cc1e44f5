"""A job survives its primaries failing over, on a real cluster of three primaries, each
with one replica, through real processes (the shape is tests/support/failover.py).

With a server and two workers running a 4,000-text job, the primary holding
the job's keys is killed with SIGKILL; its replica takes over, the killed
node comes back as a replica, and then the primary holding the queue is
killed the same way. The job must end `completed` with every index exactly
once, both in an SSE stream read throughout (resuming with Last-Event-ID
whenever it drops) and in the results pages, and no process may exit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cluster import ValkeyCluster
from tests.support.failover import job_through_two_failovers

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_job_completes_exactly_once_through_two_primary_failovers(
    ha_cluster: ValkeyCluster, tmp_path: Path
) -> None:
    def fail_over(key: str) -> int:
        """SIGKILL the primary serving `key`, wait for its replica to take over, bring
        the killed node back (as a replica) and wait until it is in sync."""
        old = ha_cluster.primary_of_key(key)
        ha_cluster.kill(old)
        ha_cluster.wait_failover(key, old)
        ha_cluster.restart(old)
        ha_cluster.wait_in_sync()
        assert ha_cluster.role(old) == "slave"
        return old

    urls = ha_cluster.urls
    print(job_through_two_failovers(urls[0], urls[1:3], tmp_path, fail_over))
