"""The bulk lane split into partitions on different hash slots (`QueueLayout`):
names every process agrees on, one per primary's slot range; a job's chunks spread
over them; a worker reads them all; the fast lane stays ahead; and on a real
three-primary cluster the queue's traffic of a large job is shared by the primaries."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.crc import key_slot

from pipeline.inputs import Item, JobOptions
from pipeline.keys import SLOTS, Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.cluster import ValkeyCluster
from tests.support.fakes import HashEmbedder
from tests.support.queue_load import queue_commands, spread
from tests.support.timings import quick
from tests.support.workers import assert_every_index_once, running, submit, texts_of, wait_end

pytestmark = pytest.mark.anyio
KEYS = Keys("es")


def slot_of(stream: str) -> int:
    return key_slot(stream[stream.index("{") + 1:stream.index("}")].encode())


@pytest.mark.parametrize("partitions", [1, 2, 3, 5, 8])
def test_each_partition_has_a_slot_range_of_its_own(partitions: int) -> None:
    layout = KEYS.layout(DEFAULT_MODEL, partitions)
    assert layout.bulks[0] == KEYS.queue(DEFAULT_MODEL, "bulk")  # as before partitions
    assert layout.fast == KEYS.queue(DEFAULT_MODEL, "fast")
    assert slot_of(layout.fast) == slot_of(layout.bulks[0])  # one blocking read
    ranges = {slot_of(bulk) * partitions // SLOTS for bulk in layout.bulks}
    assert len(ranges) == partitions
    assert KEYS.layout(DEFAULT_MODEL, partitions) == layout  # every process agrees
    assert [layout.bulk_of(c) for c in range(partitions)] == list(layout.bulks)


async def test_a_job_spread_over_partitions_completes_exactly_once(settings: Settings) -> None:
    spread_settings = quick(settings).replace(queue_partitions=3, chunk_size=4)
    pipeline = Pipeline(spread_settings)
    try:
        texts = texts_of(1, 60)
        job_id = await submit(pipeline, texts)
        layout = KEYS.layout(DEFAULT_MODEL, 3)
        assert [await pipeline.redis.xlen(bulk) for bulk in layout.bulks] == [5, 5, 5]
        async with running(spread_settings, HashEmbedder(spread_settings)):
            assert (await wait_end(pipeline, job_id))["status"] == "completed"
        await assert_every_index_once(pipeline, job_id, texts)
    finally:
        await pipeline.close()


async def test_the_fast_lane_goes_before_every_bulk_partition(settings: Settings) -> None:
    spread_settings = quick(settings).replace(queue_partitions=3, chunk_size=4,
                                              call_max_texts=4)
    pipeline = Pipeline(spread_settings)
    try:
        bulk = await submit(pipeline, texts_of(1, 48))
        small = (await pipeline.submit([Item("a question")], JobOptions())).id
        embedder = HashEmbedder(spread_settings)
        async with running(spread_settings, embedder):
            await wait_end(pipeline, small)
            await wait_end(pipeline, bulk)
        assert embedder.calls[0] == ["a question"]
    finally:
        await pipeline.close()


@pytest.mark.slow
async def test_a_large_jobs_queue_traffic_is_shared_by_three_primaries(
    valkey_cluster: ValkeyCluster, cluster_url: str, tmp_path: object
) -> None:
    base = Settings(redis_url=cluster_url, data_dir=Path(str(tmp_path)) / "data",
                    calibrate=False)  # the batch sizes and block time a deployment has
    one = await queue_commands(valkey_cluster, base.replace(queue_partitions=1), 6000)
    valkey_cluster.flush()
    spread_out = await queue_commands(valkey_cluster, base, 6000)  # auto: one per primary
    print(f"consumer-group commands per primary: one stream {one} "
          f"(max/mean {spread(one):.2f}), partitioned {spread_out} "
          f"(max/mean {spread(spread_out):.2f})")
    assert spread(one) == 3.0  # everything on one primary
    assert spread(spread_out) <= 1.5
