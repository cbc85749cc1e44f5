"""A server shutting down ends its SSE streams with a retry hint, instead of cutting them.

A real `embedstream serve` is sent SIGTERM while two streams are open (the
live feed and a job's events). Each stream must end cleanly: its last frame
is a comment saying the server is going away and a `retry:` field, so an
EventSource reconnects (to another replica, or this one restarted) after a
spread-out delay rather than all at once. The first frame carries the same
hint.
"""

from __future__ import annotations

import re
import signal
import threading
from pathlib import Path

import httpx
import pytest

from pipeline.store.embedded import EmbeddedRedis
from tests.support.processes import start_server

pytestmark = pytest.mark.slow
RETRY = re.compile(r"^retry: (\d+)$")


def read_lines(url: str, lines: list[str], opened: threading.Event) -> None:
    with httpx.stream("GET", url, timeout=30) as response:
        opened.set()
        lines.extend(response.iter_lines())


def test_sigterm_closes_open_streams_with_a_retry_hint(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis", binary="valkey") as redis_server:
        server, base = start_server(redis_server.url, tmp_path)
        job = httpx.post(f"{base}/v1/jobs", json={"inputs": ["waits for a worker"]}).json()
        streams = {"feed": f"{base}/v1/events", "job": f"{base}/v1/jobs/{job['id']}/events"}
        seen: dict[str, list[str]] = {name: [] for name in streams}
        readers = []
        for name, url in streams.items():
            opened = threading.Event()
            reader = threading.Thread(target=read_lines, args=(url, seen[name], opened))
            reader.start()
            assert opened.wait(20)
            readers.append(reader)
        try:
            assert server.stop(signal.SIGTERM, timeout_s=20) == 0
        finally:
            for reader in readers:
                reader.join(20)
    for name, lines in seen.items():
        frames = [line for line in lines if line]
        assert RETRY.match(frames[1]), (name, frames[:3])
        assert frames[-2] == ": server shutting down; reconnect", (name, frames[-4:])
        match = RETRY.match(frames[-1])
        assert match and 2000 <= int(match.group(1)) <= 4000, (name, frames[-4:])
