"""Writes that count once a replica has them (`pipeline.store.replicas`), on a real
primary with a real replica: a worker acks a chunk only once its commit is on the
replica, a submission answers only once its job is, a primary that lost its replica
acknowledges nothing, and nothing waits where there never was a replica (or with
`EMBEDSTREAM_WAIT_REPLICAS=0`)."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.errors import Unavailable
from pipeline.inputs import Item, JobOptions
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.store.replicas import Replicas
from pipeline.store.server_files import find_server_binary
from tests.support.fakes import HashEmbedder
from tests.support.processes import free_port
from tests.support.timings import quick
from tests.support.workers import BULK, KEYS, pending_count, poll, running, submit, texts_of

pytestmark = pytest.mark.anyio


def spawn(root: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    root.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([find_server_binary("valkey"), "--port", str(port), "--bind",
                             "127.0.0.1", "--dir", str(root), "--save", "", "--appendonly",
                             "no", *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.fixture
def replicated(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A primary's URL and its replica's process, the replica in sync."""
    primary_port, replica_port = free_port(), free_port()
    processes = [spawn(tmp_path / "primary", primary_port),
                 spawn(tmp_path / "replica", replica_port, "--replicaof", "127.0.0.1",
                       str(primary_port))]
    try:
        client = redis.Redis(port=primary_port, socket_timeout=2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:  # in sync once a write is confirmed by it
                client.set("probe", 1)
                if client.execute_command("WAIT", 1, 100) == 1:
                    break
            except redis.ConnectionError:
                pass
            time.sleep(0.05)
        else:
            raise AssertionError("the replica never came online")
        yield f"redis://127.0.0.1:{primary_port}/0", processes[1]
    finally:
        for process in processes:
            process.send_signal(signal.SIGCONT)
            process.kill()
            process.wait()


def waits_sent(url: str) -> int:
    stats = redis.Redis.from_url(url).info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


async def test_a_submission_and_a_commit_wait_for_the_replica(
    replicated: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    url, _ = replicated
    settings = quick(Settings(redis_url=url, data_dir=tmp_path / "data", calibrate=False))
    pipeline = Pipeline(settings)
    try:
        replicas = Replicas(pipeline.redis, KEYS, settings)
        assert await replicas.wanted() == 1
        job_id = await submit(pipeline, texts_of(1, 40))
        async with running(settings, HashEmbedder(settings)):
            await poll(lambda: _completed(pipeline, job_id))
            await poll(lambda: _nothing_pending(pipeline))
        assert waits_sent(url) >= 3  # the submission's barrier and each commit's
    finally:
        await pipeline.close()


async def test_a_commit_no_replica_confirms_is_not_acked_until_one_does(
    replicated: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    url, replica = replicated
    settings = quick(Settings(redis_url=url, data_dir=tmp_path / "data", calibrate=False,
                              wait_timeout_ms=200, visibility_timeout_s=2.0))
    pipeline = Pipeline(settings)
    try:
        job_id = await submit(pipeline, texts_of(1, 40))
        replica.send_signal(signal.SIGSTOP)
        async with running(settings, HashEmbedder(settings)):
            # Committed on the primary, each commit waiting in vain twice 200 ms.
            await poll(lambda: _completed(pipeline, job_id), timeout_s=30)
            assert await pending_count(pipeline.redis, BULK) > 0  # but not acked
            with pytest.raises(Unavailable, match="EMBEDSTREAM_WAIT_TIMEOUT_MS"):
                await pipeline.submit([Item("not confirmed")], JobOptions())
            replica.send_signal(signal.SIGCONT)
            await poll(lambda: _nothing_pending(pipeline), timeout_s=20)
    finally:
        replica.send_signal(signal.SIGCONT)
        await pipeline.close()


async def test_a_primary_that_lost_its_replica_acknowledges_no_submission(
    replicated: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    url, replica = replicated
    settings = Settings(redis_url=url, data_dir=tmp_path / "data", wait_timeout_ms=200)
    pipeline = Pipeline(settings)
    try:
        await submit(pipeline, texts_of(1, 4))  # confirmed by the replica
        replica.kill()
        replica.wait()
        with redis.Redis.from_url(url) as primary:
            await poll(lambda: _no_replica_connected(primary))
        # A deployment that had a replica still wants one, however often the client
        # retries: the write is on no other node.
        for attempt in range(3):
            with pytest.raises(Unavailable, match="EMBEDSTREAM_WAIT_TIMEOUT_MS"):
                await pipeline.submit([Item(f"on no replica, try {attempt}")], JobOptions())
    finally:
        await pipeline.close()


async def _no_replica_connected(primary: redis.Redis) -> bool:
    return int(primary.info("replication")["connected_slaves"]) == 0


async def test_nothing_waits_without_a_replica_or_when_turned_off(
    settings: Settings, replicated: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    for url, config in ((settings.redis_url, settings),
                        (replicated[0], Settings(redis_url=replicated[0],
                                                 data_dir=tmp_path / "d", wait_replicas=0))):
        assert url is not None
        config = quick(config).replace(calibrate=False)
        before = waits_sent(url)
        pipeline = Pipeline(config)
        try:
            assert await Replicas(pipeline.redis, KEYS, config).wanted() == 0
            job_id = await submit(pipeline, texts_of(2, 40))
            async with running(config, HashEmbedder(config)):
                await poll(lambda p=pipeline, j=job_id: _completed(p, j))
        finally:
            await pipeline.close()
        assert waits_sent(url) == before


async def _completed(pipeline: Pipeline, job_id: str) -> bool:
    return (await pipeline.job(job_id)).status == "completed"


async def _nothing_pending(pipeline: Pipeline) -> bool:
    return await pending_count(pipeline.redis, BULK) == 0
