"""How a large job's queue traffic falls on a cluster's primaries.

The queue is the only user of consumer groups, so the consumer-group
commands each primary ran (INFO commandstats: XREADGROUP, XACK, XCLAIM,
XAUTOCLAIM, XPENDING, XADD of queue entries aside) are its share of the
queue's traffic; calls made inside scripts count too. `queue_commands`
zeroes the counters, runs one job with an in-process worker (the fake
embedder) and reads them back per primary. Used by the partition test and
by `bench/queue_partitions.py`.
"""

from __future__ import annotations

from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.cluster import ValkeyCluster
from tests.support.fakes import HashEmbedder
from tests.support.workers import running, submit, texts_of, wait_end

GROUP_COMMANDS = ("xreadgroup", "xack", "xclaim", "xautoclaim", "xpending")


def group_commands(cluster: ValkeyCluster, index: int) -> int:
    """Consumer-group commands node `index` ran since its counters were reset."""
    with cluster.node(index) as client:
        stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
               for name in GROUP_COMMANDS)


def primaries(cluster: ValkeyCluster) -> list[int]:
    return [i for i in cluster.alive() if cluster.role(i) == "master"]


async def queue_commands(cluster: ValkeyCluster, settings: Settings, texts: int) -> list[int]:
    """Consumer-group commands per primary while one job of `texts` texts runs."""
    pipeline = Pipeline(settings)
    try:
        async with running(settings, HashEmbedder(settings)):
            for index in primaries(cluster):
                with cluster.node(index) as client:
                    client.config_resetstat()
            job_id = await submit(pipeline, texts_of(0, texts))
            end = await wait_end(pipeline, job_id, timeout_s=120)
            assert end["status"] == "completed", end
            counts = [group_commands(cluster, i) for i in primaries(cluster)]
    finally:
        await pipeline.close()
    return counts


def spread(counts: list[int]) -> float:
    """The busiest primary's count over the mean: 1.0 is an even share."""
    return max(counts) / (sum(counts) / len(counts))
