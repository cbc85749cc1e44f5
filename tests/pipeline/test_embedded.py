"""The embedded server launcher, against the real Valkey and Redis 7 binaries."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis

from pipeline.errors import Unavailable
from pipeline.settings import Settings
from pipeline.store.connections import connect_sync, is_cluster
from pipeline.store.embedded import EmbeddedRedis, find_running, redis_for
from pipeline.store.server_files import find_server_binary

REPO_ROOT = Path(__file__).resolve().parents[2]


def client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, protocol=2)


def test_server_starts_answers_and_records_itself(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, binary="valkey")
    url = server.start()
    try:
        assert url == server.url
        assert url == f"unix://{tmp_path.resolve()}/run/redis.sock?db=0"
        with client_for(url) as client:
            assert client.ping() is True
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
            assert client.config_get("save")["save"] != ""
            assert client.config_get("dir") == {"dir": str(tmp_path.resolve())}
        state = json.loads((tmp_path / "embedded.json").read_text())
        assert state == {"url": url, "pid": server.pid, "binary": server.binary}
    finally:
        server.stop()
    assert not (tmp_path / "embedded.json").exists()
    assert (tmp_path / "server.log").stat().st_size > 0


def test_data_survives_a_clean_restart_in_the_same_data_dir(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as first, client_for(first.url) as client:
        client.set("greeting", "hello")
        client.xadd("stream", {"n": "1"})
    with EmbeddedRedis(tmp_path) as second, client_for(second.url) as client:
        assert client.get("greeting") == b"hello"
        assert client.xlen("stream") == 1


def test_data_survives_a_killed_server_through_the_append_only_file(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as first:
        with client_for(first.url) as client:
            client.set("written", "before the crash")
        assert first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
    assert not (tmp_path / "dump.rdb").exists()  # so the key can only come from the AOF
    with EmbeddedRedis(tmp_path) as second, client_for(second.url) as client:
        assert client.get("written") == b"before the crash"


def test_find_running_returns_the_url_of_the_server_for_a_data_dir(tmp_path: Path) -> None:
    assert find_running(tmp_path) is None
    with EmbeddedRedis(tmp_path) as server:
        assert find_running(tmp_path) == server.url
    assert find_running(tmp_path) is None


def test_find_running_works_from_another_process(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from pipeline.store.embedded import find_running;"
        " print(find_running(Path(sys.argv[1])))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with EmbeddedRedis(tmp_path) as server:
        found = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        assert found.stdout.strip() == server.url


def test_stale_state_file_is_ignored_and_removed(tmp_path: Path) -> None:
    state = tmp_path / "embedded.json"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    state.write_text(json.dumps({"url": f"redis://127.0.0.1:{dead_port}/0", "pid": 1}))
    assert find_running(tmp_path) is None
    assert not state.exists()


def test_state_file_naming_another_servers_port_is_ignored(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "live") as other:
        state = tmp_path / "stale" / "embedded.json"
        state.parent.mkdir()
        state.write_text(json.dumps({"url": other.url, "pid": -1, "binary": "x"}))
        assert find_running(tmp_path / "stale") is None
        assert not state.exists()


def test_garbled_state_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "embedded.json").write_text("{not json")
    assert find_running(tmp_path) is None


def test_missing_binary_gives_a_clear_unavailable(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, binary=str(tmp_path / "no-such-server"))
    with pytest.raises(Unavailable, match="no Redis-compatible server binary found"):
        server.start()
    assert not (tmp_path / "embedded.json").exists()


def test_missing_redis_server_names_the_package_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(Unavailable, match="apt-get install redis-server"):
        find_server_binary("redis")


def test_server_that_cannot_start_reports_the_tail_of_its_log(tmp_path: Path) -> None:
    failing = tmp_path / "failing-server"
    failing.write_text("#!/bin/sh\necho 'FATAL: cannot open the socket' >&2\nexit 3\n")
    failing.chmod(0o755)
    server = EmbeddedRedis(tmp_path / "data", binary=str(failing))
    with pytest.raises(Unavailable, match=r"(?s)exited with code 3.*cannot open the socket"):
        server.start()
    assert server.pid is None
    assert not (tmp_path / "data" / "embedded.json").exists()


def test_second_server_on_the_same_data_dir_is_refused(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as first:
        with pytest.raises(Unavailable, match="another embedded server owns"):
            EmbeddedRedis(tmp_path).start()
        assert find_running(tmp_path) == first.url


def test_redis_for_uses_the_configured_url_without_starting_a_server(tmp_path: Path) -> None:
    settings = Settings(redis_url="redis://example.invalid:6379/0", data_dir=tmp_path)
    with redis_for(settings) as url:
        assert url == "redis://example.invalid:6379/0"
    assert not (tmp_path / "embedded.json").exists()


def test_redis_for_starts_a_server_and_stops_it_on_exit(tmp_path: Path) -> None:
    settings = Settings(redis_url=None, data_dir=tmp_path)
    with redis_for(settings) as url:
        assert find_running(tmp_path) == url
        with client_for(url) as client:
            assert client.ping() is True
    assert find_running(tmp_path) is None


def test_redis_for_shares_the_server_already_running_for_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(redis_url=None, data_dir=tmp_path)
    with redis_for(settings) as outer:
        with redis_for(settings) as inner:
            assert inner == outer
        assert find_running(tmp_path) == outer  # the inner user did not stop it


def test_concurrent_redis_for_calls_share_one_server(tmp_path: Path) -> None:
    settings = Settings(redis_url=None, data_dir=tmp_path)
    both_inside = threading.Barrier(2, timeout=30)
    urls: list[str] = []

    def use_server() -> None:
        with redis_for(settings) as url:
            urls.append(url)
            both_inside.wait()

    threads = [threading.Thread(target=use_server) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(urls) == 2 and urls[0] == urls[1]


def test_works_with_redis_server_7_too(tmp_path: Path, redis7_binary: str) -> None:
    with EmbeddedRedis(tmp_path, binary=redis7_binary) as first, client_for(first.url) as client:
        assert client.ping() is True
        client.set("greeting", "hello")
        client.xadd("stream", {"n": "1"})
    with EmbeddedRedis(tmp_path, binary="redis") as second, client_for(second.url) as client:
        assert client.get("greeting") == b"hello"
        assert client.xlen("stream") == 1


@pytest.mark.parametrize("attempt", [1, 2])
def test_session_servers_are_flushed_between_tests(any_redis_url: str, attempt: int) -> None:
    with connect_sync(any_redis_url) as client:
        # A cluster client's DBSIZE asks one node; every primary must be empty.
        every = {"target_nodes": redis.RedisCluster.PRIMARIES} if is_cluster(client) else {}
        assert client.dbsize(**every) == 0
        for key in ("left-behind", "left-behind-too", "{other}left-behind"):
            client.set(key, "1")
