"""Starting embedstream's real processes for end-to-end tests.

Each process gets its own log file (shown when a test fails to start it) and
is stopped with SIGTERM, then SIGKILL; `kill()` is the kill -9 of crash tests.
Readiness is polled with a deadline, never slept on.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `check` until it is true, or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")


class Process:
    """One `python -m embedstream ...` child with a log file."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.args = args
        self.log_path = log_path
        self._log = log_path.open("wb")
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "PYTHONPATH": str(ROOT), **env}
        self.popen = subprocess.Popen([sys.executable, "-m", "embedstream", *args],
                                      stdout=self._log, stderr=subprocess.STDOUT,
                                      env=full_env, cwd=ROOT)

    def log(self) -> str:
        """What the process printed so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Signal the process and wait for it; SIGKILL if it does not exit (idempotent)."""
        if self.alive():
            self.popen.send_signal(sig)
        try:
            code = self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            code = self.popen.wait()
        self._log.close()
        return code

    def kill(self) -> None:
        """kill -9."""
        self.stop(signal.SIGKILL)


def start_server(redis_url: str, log_dir: Path, **env: str) -> tuple[Process, str]:
    """`embedstream serve` on a free port; returns (process, base URL) once /healthz answers."""
    port = free_port()
    process = Process(["serve", "--port", str(port), "--log-level", "warning"],
                      log_dir / f"serve-{port}.log",
                      {"EMBEDSTREAM_REDIS_URL": redis_url, **env})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(process, f"{base}/healthz", 60)
    except BaseException:
        process.stop()
        raise
    return process, base


def start_worker(redis_url: str, log_dir: Path, name: str, **env: str) -> Process:
    """`embedstream worker`; use wait_for_workers to know it is up."""
    return Process(["worker", "--log-level", "info"], log_dir / f"worker-{name}.log",
                   {"EMBEDSTREAM_REDIS_URL": redis_url, **env})


def wait_for_http(process: Process, url: str, timeout_s: float) -> None:
    """Poll `url` until it answers 200, failing early if the process died."""
    def answers() -> bool:
        if not process.alive():
            raise RuntimeError(f"process exited:\n{process.log()[-3000:]}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    wait_until(answers, timeout_s, url)


def wait_for_workers(base: str, count: int, timeout_s: float = 120) -> None:
    """Poll /readyz until `count` workers are alive."""
    def enough() -> bool:
        try:
            return int(httpx.get(f"{base}/readyz", timeout=2).json()["workers"]) >= count
        except (httpx.HTTPError, ValueError, KeyError):
            return False
    wait_until(enough, timeout_s, f"{count} workers")
