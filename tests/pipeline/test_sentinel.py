"""Redis behind Sentinel (`redis+sentinel://`), on a real deployment (tests/support/sentinel.py).

A module-wide deployment serves the tests that leave both nodes running; a
test that kills a primary gets a deployment of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis
from redis.exceptions import ConnectionError as RedisConnectionError

from pipeline.errors import Unavailable
from pipeline.inputs import Item, JobOptions
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.store.connections import cluster_enabled, connect, connect_sync, is_cluster
from pipeline.store.sentinel import (
    DEFAULT_PORT,
    FollowingConnection,
    FollowingSSLConnection,
    parse_sentinel_url,
)
from pipeline.store.server_files import find_server_binary
from tests.support.fakes import SlowEmbedder
from tests.support.sentinel import ValkeySentinel
from tests.support.timings import quick
from tests.support.workers import (
    KEYS,
    assert_every_index_once,
    poll,
    running,
    submit,
    texts_of,
)

pytestmark = pytest.mark.anyio
BUMP = "return redis.call('INCR', KEYS[1])"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeySentinel]:
    """The module's deployment: a primary, a replica, three sentinels."""
    with ValkeySentinel(tmp_path_factory.mktemp("sentinel"),
                        find_server_binary("valkey")) as started:
        yield started


@pytest.fixture
def sentinel_url(deployment: ValkeySentinel) -> str:
    """The module deployment's URL, its data and both nodes' script caches emptied."""
    with connect_sync(deployment.url) as client:
        client.flushall()
    for index in range(len(deployment.node_ports)):
        with deployment.node(index) as node:
            node.script_flush()
    return deployment.url


@pytest.fixture
def doomed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeySentinel]:
    """A deployment of the test's own, for a test that kills its primary."""
    with ValkeySentinel(tmp_path_factory.mktemp("sentinel"),
                        find_server_binary("valkey")) as started:
        yield started


# URLs


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_database() -> None:
    target = parse_sentinel_url("redis+sentinel://h1:26380,h2/mymaster/3")
    assert target.sentinels == (("h1", 26380), ("h2", DEFAULT_PORT))
    assert (target.service_name, target.tls, target.sentinel_password) == ("mymaster", False, None)
    assert target.connection == {"db": 3}
    assert target.primary_options()["connection_class"] is FollowingConnection
    assert target.sentinel_options() == {}


def test_a_tls_sentinel_url_has_credentials_for_the_primary_and_the_sentinels() -> None:
    target = parse_sentinel_url("REDISS+SENTINEL://app:p%40ss@[::1]:26379,[fe80::2]/cache"
                                "?sentinel_password=s3cret&ssl_ca_certs=/etc/ca.pem"
                                "&socket_timeout=3")
    assert target.sentinels == (("::1", 26379), ("fe80::2", DEFAULT_PORT))
    assert (target.service_name, target.tls) == ("cache", True)
    assert target.connection == {"username": "app", "password": "p@ss",
                                 "ssl_ca_certs": "/etc/ca.pem", "socket_timeout": 3.0}
    assert target.primary_options()["connection_class"] is FollowingSSLConnection
    # The sentinels get their own password, never the primary's, and the TLS settings.
    assert target.sentinel_options() == {"ssl": True, "ssl_ca_certs": "/etc/ca.pem",
                                         "password": "s3cret"}


@pytest.mark.parametrize(("url", "problem"), [
    ("redis://h1:26379/mymaster", "starts with redis+sentinel://"),
    ("redis+sentinel:///mymaster", "names no sentinel"),
    ("redis+sentinel://h1:26379", "names no service"),
    ("redis+sentinel://h1:26379/", "names no service"),
    ("redis+sentinel://h1:sentinel/mymaster", "bad port"),
    ("redis+sentinel://h1:70000/mymaster", "bad port"),
    ("redis+sentinel://h1,,h2/mymaster", "has no host"),
    ("redis+sentinel://[::1]x/mymaster", "malformed"),
    ("redis+sentinel://h1/mymaster/zero", "database must be a number"),
    ("redis+sentinel://h1/mymaster/0/1", "/service or /service/db"),
    ("redis+sentinel://h1/mymaster?socket_timeout=soon", "socket_timeout"),
])
def test_a_malformed_sentinel_url_is_refused_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_sentinel_url(url)


def test_connect_refuses_a_malformed_sentinel_url_and_never_probes_for_a_cluster() -> None:
    with pytest.raises(ValueError, match="names no service"):
        connect("redis+sentinel://127.0.0.1:1")
    # Nothing listens on port 1: a probe would log a warning and take a timeout.
    assert not cluster_enabled("redis+sentinel://127.0.0.1:1/mymaster")


# A running deployment


async def test_a_client_through_the_sentinels_reads_and_writes_on_the_primary(
    deployment: ValkeySentinel, sentinel_url: str
) -> None:
    client, blocking = connect(sentinel_url), connect(sentinel_url, blocking=True)
    try:
        assert not is_cluster(client)
        await client.set("greeting", "hello")
        assert await client.get("greeting") == b"hello"  # bytes replies, as on one server
        first = await client.xadd("events", {"type": "result"})
        reply = await blocking.xread({"events": "0"}, count=1, block=1000)
        assert reply[0][1][0][0] == first
    finally:
        await client.aclose()
        await blocking.aclose()
    with deployment.node(deployment.primary_index()) as primary:
        assert primary.get("greeting") == b"hello"
    with connect_sync(sentinel_url) as sync_client:
        assert sync_client.get("greeting") == b"hello"


async def bump_twice_in_a_pipeline(client: Any, transaction: bool) -> list[Any]:
    """A script and a command in one pipeline: the shape of a worker's commit."""
    async with client.pipeline(transaction=transaction) as pipe:
        await client.register_script(BUMP)(keys=["count"], client=pipe)
        pipe.incrby("count", 1)
        return list(await pipe.execute())


# Each way a client writes, each on a client of its own: once one of a client's
# connections has met the demoted primary, the pool closes the others.
WRITES = {
    "command": lambda client: client.incrby("count", 1),
    "script": lambda client: client.register_script(BUMP)(keys=["count"]),
    "transaction": lambda client: bump_twice_in_a_pipeline(client, transaction=True),
    "pipeline": lambda client: bump_twice_in_a_pipeline(client, transaction=False),
}


async def test_a_demoted_primary_is_dropped_for_the_new_one(
    deployment: ValkeySentinel, sentinel_url: str
) -> None:
    clients = {name: connect(sentinel_url) for name in WRITES}
    blocking = connect(sentinel_url, blocking=True)
    try:
        # Each client writes once: it holds a connection to the first primary, whose
        # script cache has the script, as in a process that has been running.
        for name, write in WRITES.items():
            assert await write(clients[name]), name
        assert await clients["command"].execute_command("WAIT", 1, 5000) == 1
        reader = asyncio.create_task(blocking.xread({"events": "$"}, count=1, block=60_000))
        await poll(lambda: blocked_on(deployment, deployment.primary_index()))
        old, new = await anyio.to_thread.run_sync(deployment.hand_over)
        # Every connection still leads to the old primary, now a replica: its READONLY
        # drops the connection, and the write goes to the new primary.
        for name, write in WRITES.items():
            assert await write(clients[name]), name
        # The blocked read was ended by the demotion (UNBLOCKED) and waits on the new one.
        await poll(lambda: blocked_on(deployment, new))
        entry = await clients["command"].xadd("events", {"type": "end"})
        assert (await asyncio.wait_for(reader, 10))[0][1][0][0] == entry
    finally:
        for client in [*clients.values(), blocking]:
            await client.aclose()
    with deployment.node(new) as primary:
        assert primary.get("count") == b"12"  # 1 + 1 + 2 + 2, before and after
    with deployment.node(old) as replica, pytest.raises(redis.ReadOnlyError):
        replica.set("count", 0)


async def test_a_script_first_called_on_a_demoted_primary_runs_on_the_new_one(
    deployment: ValkeySentinel, sentinel_url: str
) -> None:
    client = connect(sentinel_url)
    try:
        assert await client.incrby("count", 1) == 1  # a connection to the first primary
        assert await client.execute_command("WAIT", 1, 5000) == 1
        await anyio.to_thread.run_sync(deployment.hand_over)
        assert await client.register_script(BUMP)(keys=["count"]) == 2
    finally:
        await client.aclose()


async def blocked_on(deployment: ValkeySentinel, index: int) -> bool:
    """Whether a client is blocked (XREAD BLOCK) on node `index`."""
    with deployment.node(index) as node:
        return int(node.info("clients")["blocked_clients"]) > 0


# Failovers


async def job_progress(pipeline: Pipeline, job_id: str) -> Any:
    """The job's record, or None while Redis is away (a failover in progress)."""
    with contextlib.suppress(Unavailable):
        return await pipeline.job(job_id)
    return None


async def test_a_job_completes_when_its_primary_is_killed_mid_job(
    doomed: ValkeySentinel, tmp_path: Path
) -> None:
    settings = quick(Settings(redis_url=doomed.url, data_dir=tmp_path / "data", key_prefix="es"))
    texts = texts_of(1, 300)
    pipeline = Pipeline(settings)
    try:
        async with running(settings, SlowEmbedder(settings, delay_s=0.05)) as worker:
            job_id = await submit(pipeline, texts)

            async def started() -> Any:
                job = await pipeline.job(job_id)
                return job if job.done >= 40 else None
            job = await poll(started)
            assert job.done < len(texts), "the job ended before the kill: nothing was tested"
            old = doomed.kill_primary()
            assert await anyio.to_thread.run_sync(doomed.wait_failover, old) != old
            # Until the killed node is back as a replica, no commit counts as safe.
            await anyio.to_thread.run_sync(doomed.restart, old)

            async def ended() -> Any:
                job = await job_progress(pipeline, job_id)
                return job if job is not None and job.status != "running" else None
            await poll(ended, timeout_s=30)
            assert not worker.task.done(), "the worker exited"
        await assert_every_index_once(pipeline, job_id, texts)
    finally:
        await pipeline.close()


async def test_a_primary_whose_replica_is_down_acknowledges_no_submission(
    doomed: ValkeySentinel, tmp_path: Path
) -> None:
    replica = 1 - doomed.primary_index()
    doomed.kill(replica)
    # Started with the replica down: the sentinels still list it, so the deployment is
    # replicated, and a job no replica has is not acknowledged.
    settings = Settings(redis_url=doomed.url, data_dir=tmp_path / "data", key_prefix="es",
                        wait_timeout_ms=200)
    pipeline = Pipeline(settings)
    try:
        with pytest.raises(Unavailable, match="EMBEDSTREAM_WAIT_TIMEOUT_MS"):
            await pipeline.submit([Item("on no replica")], JobOptions())
        await anyio.to_thread.run_sync(doomed.restart, replica)
        job = await pipeline.submit([Item("on the replica")], JobOptions())
    finally:
        await pipeline.close()
    with doomed.node(replica) as node:
        assert node.exists(KEYS.job(job.id))


@pytest.mark.slow
async def test_a_killed_primary_comes_back_as_a_replica_of_the_new_one(
    doomed: ValkeySentinel
) -> None:
    client = connect(doomed.url)
    try:
        await client.set("before", "kept")
        assert await client.execute_command("WAIT", 1, 5000) == 1
        old = doomed.kill_primary()
        new = await anyio.to_thread.run_sync(doomed.wait_failover, old)

        async def written() -> bool:
            with contextlib.suppress(RedisConnectionError):
                return bool(await client.set("after", "new"))
            return False
        await poll(written)
        # The restarted node replicates the new primary, which the sentinels still name.
        await anyio.to_thread.run_sync(doomed.restart, old)
        assert doomed.primary_index() == new
        assert await client.incrby("count", 1) == 1
        assert await client.execute_command("WAIT", 1, 5000) == 1
    finally:
        await client.aclose()
    with doomed.node(old) as replica:
        assert replica.mget("before", "after", "count") == [b"kept", b"new", b"1"]
        with pytest.raises(redis.ReadOnlyError):
            replica.set("count", 0)
