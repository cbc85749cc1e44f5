"""How a large job's queue traffic falls on a cluster's primaries, with the bulk lane as one
stream and split into partitions (`EMBEDSTREAM_QUEUE_PARTITIONS`).

Starts a real three-primary Valkey cluster (tests/support/cluster.py), runs one job with an
in-process worker and the fake embedder (the model is not what is measured), and prints the
consumer-group commands each primary ran (INFO commandstats: XREADGROUP, XACK, XCLAIM,
XAUTOCLAIM, XPENDING; only the queue uses consumer groups), with one partition and with the
default (one per primary), and the busiest primary's count over the mean (1.00 is an even share).

    .venv/bin/python bench/queue_partitions.py [--texts 6000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.settings import Settings  # noqa: E402
from pipeline.store.server_files import find_server_binary  # noqa: E402
from tests.support.cluster import ValkeyCluster  # noqa: E402
from tests.support.queue_load import queue_commands, spread  # noqa: E402


async def main(texts: int) -> None:
    with tempfile.TemporaryDirectory() as root, \
            ValkeyCluster(Path(root) / "cluster", find_server_binary("valkey")) as cluster:
        settings = Settings(redis_url=cluster.url, data_dir=Path(root) / "data",
                            calibrate=False)
        rows = []
        for label, partitions in (("one stream", 1), ("partitioned (auto)", 0)):
            cluster.flush()
            counts = await queue_commands(cluster, settings.replace(queue_partitions=partitions),
                                          texts)
            rows.append((label, counts))
        print(f"consumer-group commands per primary, one job of {texts} texts, 3 primaries")
        for label, counts in rows:
            shares = " ".join(f"{c:>6}" for c in counts)
            print(f"  {label:<20} {shares}   max/mean {spread(counts):.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=6000)
    asyncio.run(main(parser.parse_args().texts))
