"""Disconnects: stop a request's work at once when its HTTP client hangs up.

Starlette does not cancel a handler whose client went away: a handler that
waits (for an embedding, a job's rows) would wait out its whole timeout,
holding its reply waiter, its quota slot and its job. Once the body has
been read, the only message left on the request's receive channel is
`http.disconnect`, so watching that channel alongside the work tells a
hang-up the moment the server notices it; the work is then cancelled (its
cleanup, such as cancelling a job, runs shielded) and the handler answers
`CLIENT_CLOSED_REQUEST`, which nobody reads.

Watch only after the body is read: the watcher consumes receive messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from pipeline import cancel_and_wait

T = TypeVar("T")
# What the access log shows for a request whose client left first (nginx's convention).
CLIENT_CLOSED_REQUEST = 499


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


async def _disconnected(request: Request) -> None:
    """Return when the client hangs up (the request's body already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; ClientGone (with `work` cancelled) if the client hangs up first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # the handler itself may be cancelled: neither task outlives it
        await cancel_and_wait(watcher)
        if not task.done():
            await cancel_and_wait(task)
    if task.cancelled():
        raise ClientGone("the client disconnected")
    return task.result()
