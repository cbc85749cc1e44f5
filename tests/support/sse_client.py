"""A minimal SSE reader for tests: (id, event, data) tuples from an httpx stream."""

from __future__ import annotations

from collections.abc import Iterator
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
