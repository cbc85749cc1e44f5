"""A minimal SSE reader for tests: (id, event, data) tuples from an httpx stream, and a
thread that reads one job's stream to its end through drops and failovers."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson


@dataclass(frozen=True)
class SSE:
    id: str | None
    event: str
    data: Any


def read_events(response: httpx.Response) -> Iterator[SSE]:
    """Parse a text/event-stream response as it arrives (comments and pings skipped)."""
    event_id: str | None = None
    event = "message"
    data: list[str] = []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield SSE(event_id, event, orjson.loads("\n".join(data)))
            event, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            event_id = value
        elif name == "event":
            event = value
        elif name == "data":
            data.append(value)


class Reader(threading.Thread):
    """Reads a job's SSE stream to its end, resuming with Last-Event-ID after any drop
    (from the server `base` names then, if it is a function), and counts every index
    it is given; `stop()` ends it early."""

    def __init__(self, base: str | Callable[[], str], job_id: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.path = f"/v1/jobs/{job_id}/events"
        self.seen: dict[int, int] = {}
        self.end: dict[str, Any] | None = None
        self.resumes = 0
        self.last_id: str | None = None
        self.stopped = threading.Event()

    def stop(self) -> None:
        self.stopped.set()

    def run(self) -> None:
        while self.end is None and not self.stopped.is_set():
            headers = {"Last-Event-ID": self.last_id} if self.last_id else {}
            base = self.base() if callable(self.base) else self.base
            with (contextlib.suppress(httpx.HTTPError),
                  httpx.stream("GET", base + self.path, headers=headers,
                               timeout=httpx.Timeout(10, read=60)) as response):
                if response.status_code == 200:
                    self._read(response)
            if self.end is None:
                self.resumes += 1
                self.stopped.wait(0.2)

    def _read(self, response: httpx.Response) -> None:
        for event in read_events(response):
            self.last_id = event.id or self.last_id
            if event.event == "result":
                for row in event.data:
                    self.seen[row["index"]] = self.seen.get(row["index"], 0) + 1
            elif event.event == "end":
                self.end = event.data
                return


def results_pages(base: str, job_id: str) -> dict[int, int]:
    """How many times each index appears in the job's results pages (none for a job
    that is gone: the checks then count each of its indexes missing)."""
    counts: dict[int, int] = {}
    cursor = None
    while True:
        params = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = _page(f"{base}/v1/jobs/{job_id}/results", params)
        for row in page["results"]:
            counts[row["index"]] = counts.get(row["index"], 0) + 1
        cursor = page.get("next_cursor")
        if not cursor:
            return counts


def _page(url: str, params: dict[str, Any], attempts: int = 30) -> dict[str, Any]:
    """One results page, empty if the job is gone; a 503 (Redis failing over) is asked
    again a little later."""
    for _ in range(attempts):
        reply = httpx.get(url, params=params, timeout=30)
        if reply.status_code == 404 and reply.json()["error"]["code"] == "job_not_found":
            return {"results": []}
        if reply.status_code != 503:
            assert reply.status_code == 200, reply.text
            page: dict[str, Any] = reply.json()
            return page
        time.sleep(1)
    raise AssertionError(f"{url} answered 503 {attempts} times")
