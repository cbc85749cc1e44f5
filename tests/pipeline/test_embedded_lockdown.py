"""The embedded server is its user's alone: a private Unix socket, no TCP port, private files."""

import json
import os
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.errors import Unavailable
from pipeline.settings import Settings
from pipeline.store import server_files
from pipeline.store.embedded import EmbeddedRedis, ServerKeeper, find_running, redis_for
from pipeline.store.server_files import find_server_binary, server_pid, socket_path
from tests.support.processes import free_port, wait_until

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads /proc")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def tcp_listeners(pid: int) -> list[str]:
    """The TCP sockets process `pid` listens on (inodes of /proc/net/tcp* rows in LISTEN)."""
    own = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        if target.startswith("socket:["):
            own.add(target[len("socket:["):-1])
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in own:  # 0A: LISTEN
                    listening.append(fields[1])
    return listening


@pytest.fixture
def short_root() -> Iterator[Path]:
    """A short private folder standing in for /tmp as the root of fallback socket dirs."""
    root = Path(tempfile.mkdtemp(prefix="es-", dir="/tmp"))
    try:
        yield root
    finally:
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_the_server_listens_on_a_private_socket_and_no_tcp_port(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, binary="valkey") as server:
        assert server.pid is not None
        assert server.socket == tmp_path.resolve() / "run" / "redis.sock"
        assert mode(server.socket.parent) == 0o700
        assert stat.S_ISSOCK(os.lstat(server.socket).st_mode)
        assert mode(server.socket) == 0o700
        assert tcp_listeners(server.pid) == []
        with redis.Redis.from_url(server.url, protocol=2) as client:
            assert client.config_get("port") == {"port": "0"}
            client.set("written", "by its user")
            client.bgsave()
        state = json.loads((tmp_path / "embedded.json").read_text())
        assert state["url"] == f"unix://{server.socket}?db=0"
    for written in (tmp_path / "server.log", tmp_path / "appendonlydir"):
        assert mode(written) & 0o077 == 0, written  # neither group nor others may read


def test_the_server_works_with_redis_7_on_a_socket_too(tmp_path: Path,
                                                       redis7_binary: str) -> None:
    with EmbeddedRedis(tmp_path, binary=redis7_binary) as server:
        assert server.pid is not None and tcp_listeners(server.pid) == []
        with redis.Redis.from_url(server.url, protocol=2) as client:
            assert client.ping() is True


def test_a_data_dir_too_deep_for_a_socket_gets_a_short_private_one(
    tmp_path: Path, short_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_files, "SHORT_SOCKET_ROOT", short_root)
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    with EmbeddedRedis(deep, binary="valkey") as server:
        assert server.socket.parent.parent == short_root
        assert server.socket.parent.name.startswith(f"embedstream-{os.geteuid()}-")
        assert mode(server.socket.parent) == 0o700
        assert len(os.fsencode(server.socket)) <= server_files.SOCKET_PATH_MAX
        assert find_running(deep) == server.url  # recorded in embedded.json
        with redis.Redis.from_url(server.url, protocol=2) as client:
            assert client.ping() is True
    assert socket_path(deep) == server.socket  # the same place on every start


def test_a_planted_socket_dir_is_refused(
    tmp_path: Path, short_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_files, "SHORT_SOCKET_ROOT", short_root)
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    socket_path(deep).parent.symlink_to(elsewhere)
    with pytest.raises(Unavailable, match="is not a directory of this user"):
        EmbeddedRedis(deep, binary="valkey").start()
    assert not (deep / "embedded.json").exists()


def test_a_loose_socket_dir_is_made_private_again(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir(mode=0o755)
    os.chmod(tmp_path / "run", 0o755)
    with EmbeddedRedis(tmp_path, binary="valkey"):
        assert mode(tmp_path / "run") == 0o700


def test_a_stale_state_file_of_a_tcp_server_is_replaced_by_a_socket_server(
    tmp_path: Path,
) -> None:
    (tmp_path / "embedded.json").write_text(
        json.dumps({"url": "redis://127.0.0.1:1/0", "pid": 1, "binary": "valkey-server"}))
    with redis_for(Settings(redis_url=None, data_dir=tmp_path)) as url:
        assert url.startswith("unix://")
        assert json.loads((tmp_path / "embedded.json").read_text())["url"] == url


def test_a_live_tcp_server_of_an_older_version_is_still_used_but_not_restarted(
    tmp_path: Path,
) -> None:
    port = free_port()
    old = subprocess.Popen([find_server_binary("valkey"), "--port", str(port), "--bind",
                            "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        wait_until(lambda: server_pid(url, timeout_s=1.0) == old.pid, 10, "the old server")
        (tmp_path / "embedded.json").write_text(json.dumps({"url": url, "pid": old.pid}))
        assert find_running(tmp_path) == url
        assert not ServerKeeper(tmp_path, url).restartable
        assert ServerKeeper(tmp_path, f"unix://{socket_path(tmp_path)}?db=0").restartable
    finally:
        old.terminate()
        old.wait(timeout=10)
