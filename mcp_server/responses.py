"""Building responses: JSON bodies, and every SSE stream (one helper for all of them).

`event_stream` is the only place an `EventSourceResponse` is built. It

- serializes events with orjson straight from numpy (no per-float Python work);
- closes the event generator explicitly when the stream ends for any reason
  (client gone, send timeout, shutdown), so its Redis subscription and
  buffers are released at once, not when the garbage collector gets there;
- sends a `retry:` hint first, with a random part, so a thousand browsers
  that lose the server together do not reconnect in the same millisecond;
- ends the stream when the server shuts down with a last comment and the
  same `retry:` hint (sse-starlette's shutdown signal, with a short grace
  period), instead of cutting it mid-event;
- ends the stream of a subscriber that fell too far behind its fan-out
  buffer (`SubscriberDropped`): the browser resumes with `Last-Event-ID`.

Deliberate choice, so nobody "fixes" it: sse-starlette only calls `set()` on
its `shutdown_event`, so `_Shutdown` is a small object with `set()` and
`wait()` rather than an `anyio.Event` (whose `set` cannot be hooked).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, cast

import anyio
import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import Response

from pipeline import Settings
from pipeline.jobs import Event
from pipeline.store import SubscriberDropped

SEND_TIMEOUT_S = 30.0
SHUTDOWN_GRACE_S = 1.0
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """orjson-encoded JSON (numpy rows included)."""
    return Response(orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json", headers=headers)


class _Shutdown:
    """Set by sse-starlette when the server begins to shut down."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()


def retry_hint_ms(settings: Settings) -> int:
    """The reconnect delay to ask for: the configured one plus up to as much again."""
    return settings.sse_retry_ms + random.randrange(settings.sse_retry_ms + 1)


def event_stream(events: AsyncGenerator[Event, None], settings: Settings) -> EventSourceResponse:
    """An SSE response carrying `events`, closed and shut down as described above."""
    shutdown = _Shutdown()
    return EventSourceResponse(
        _body(events, shutdown, retry_hint_ms(settings)), ping=settings.sse_ping_s,
        send_timeout=SEND_TIMEOUT_S, headers=SSE_HEADERS,
        shutdown_event=cast(anyio.Event, shutdown), shutdown_grace_period=SHUTDOWN_GRACE_S)


async def _body(
    events: AsyncGenerator[Event, None], shutdown: _Shutdown, retry_ms: int
) -> AsyncIterator[ServerSentEvent]:
    stopping = asyncio.ensure_future(shutdown.wait())
    following: asyncio.Future[Event] | None = None
    try:
        yield ServerSentEvent(comment="embedstream", retry=retry_ms)
        while True:
            following = asyncio.ensure_future(anext(events))
            await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                yield ServerSentEvent(comment="server shutting down; reconnect", retry=retry_ms)
                return
            try:
                event = following.result()
            except StopAsyncIteration:
                return
            except SubscriberDropped:
                yield ServerSentEvent(comment="too far behind; resume with Last-Event-ID",
                                      retry=retry_ms)
                return
            data = orjson.dumps(event.data, option=orjson.OPT_SERIALIZE_NUMPY).decode()
            yield ServerSentEvent(data=data, event=event.name, id=event.id)
    finally:
        stopping.cancel()
        # The generator cannot be closed while a task is inside it: stop that first.
        if following is not None and not following.done():
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration,
                                     SubscriberDropped):
                await following
        await events.aclose()
