"""SSE endpoints: a job's results as they are made, and the live feed.

sse-starlette does nothing with `Last-Event-ID`; resuming is ours. The
header wins over `?after=`, because a browser's EventSource reconnects to the
original URL (with its original `after`) and sends the header. Event ids are
validated before the stream opens, so a malformed one is a 400, not a broken
stream. Vectors are serialized by orjson straight from numpy (no per-float
Python work); NaN cannot occur (the worker fails such inputs).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.routing import Route

from mcp_server.payloads import pipeline_of, query_encoding, request_caller, settings_of
from pipeline.events import Event, check_event_id

SEND_TIMEOUT_S = 30.0
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def resume_cursor(request: Request) -> str | None:
    """Where to resume: Last-Event-ID, else ?after=, else None (the start)."""
    after = request.headers.get("last-event-id") or request.query_params.get("after")
    if after:
        check_event_id(after)
    return after or None


async def _sse(events: AsyncIterator[Event]) -> AsyncIterator[ServerSentEvent]:
    async for event in events:
        data = orjson.dumps(event.data, option=orjson.OPT_SERIALIZE_NUMPY).decode()
        yield ServerSentEvent(data=data, event=event.name, id=event.id)


async def job_events(request: Request) -> EventSourceResponse:
    """GET /v1/jobs/{id}/events: result, progress and a final end event."""
    pipeline = pipeline_of(request)
    job_id = request.path_params["job_id"]
    after = resume_cursor(request)
    caller = request_caller(request)
    # 404/400 (and a missing calibration) before the stream opens
    await pipeline.job(job_id, caller)
    view = await pipeline.view(job_id, query_encoding(request))
    return EventSourceResponse(
        _sse(pipeline.follow(job_id, after, view, caller=caller)),
        ping=settings_of(request).sse_ping_s, send_timeout=SEND_TIMEOUT_S, headers=HEADERS,
    )


async def feed_events(request: Request) -> EventSourceResponse:
    """GET /v1/events: job and worker lifecycle plus periodic stats; never vectors."""
    pipeline = pipeline_of(request)
    return EventSourceResponse(
        _sse(pipeline.follow_feed(resume_cursor(request), caller=request_caller(request))),
        ping=settings_of(request).sse_ping_s, send_timeout=SEND_TIMEOUT_S, headers=HEADERS,
    )


routes = [
    Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
    Route("/v1/events", feed_events, methods=["GET"]),
]
