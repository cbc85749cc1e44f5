"""SSE endpoints: a job's results as they are made, and the live feed.

sse-starlette does nothing with `Last-Event-ID`; resuming is ours. The
header wins over `?after=`, because a browser's EventSource reconnects to the
original URL (with its original `after`) and sends the header. Event ids are
validated before the stream opens, so a malformed one is a 400, not a broken
stream. Vectors are serialized by orjson straight from numpy (no per-float
Python work); NaN cannot occur (the worker fails such inputs). Every stream
is built by `mcp_server.responses.event_stream`, and read through the
process's fan-out hubs (one Redis reader per stream, `pipeline.store.fanout`).
"""

from __future__ import annotations

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.routing import Route

from mcp_server.payloads import pipeline_of, query_encoding, request_caller, settings_of
from mcp_server.responses import event_stream
from pipeline.jobs import check_event_id


def resume_cursor(request: Request) -> str | None:
    """Where to resume: Last-Event-ID, else ?after=, else None (the start)."""
    after = request.headers.get("last-event-id") or request.query_params.get("after")
    if after:
        check_event_id(after)
    return after or None


async def job_events(request: Request) -> EventSourceResponse:
    """GET /v1/jobs/{id}/events: result, progress and a final end event."""
    pipeline = pipeline_of(request)
    job_id = request.path_params["job_id"]
    after = resume_cursor(request)
    caller = request_caller(request)
    # 404/400 (and a missing calibration) before the stream opens
    await pipeline.job(job_id, caller)
    view = await pipeline.view(job_id, query_encoding(request), caller)
    return event_stream(pipeline.follow(job_id, after, view, caller=caller),
                        settings_of(request))


async def feed_events(request: Request) -> EventSourceResponse:
    """GET /v1/events: job and worker lifecycle plus periodic stats; never vectors."""
    pipeline = pipeline_of(request)
    return event_stream(pipeline.follow_feed(resume_cursor(request),
                                             caller=request_caller(request)),
                        settings_of(request))


routes = [
    Route("/v1/jobs/{job_id}/events", job_events, methods=["GET"]),
    Route("/v1/events", feed_events, methods=["GET"]),
]
