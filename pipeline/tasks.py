"""Stopping a task for certain.

`Task.cancel()` asks once, and a library can swallow that one request. On
Python 3.11, `asyncio.wait_for` returns its result instead of raising when the
cancel lands as the awaited operation completes, and redis-py wraps every
socket write in it: a task cancelled at that moment runs on as if nothing had
happened, and whoever awaits it waits for ever.

The request is still counted (`Task.cancelling()`), so long-running loops call
`honour_cancel()` once a round, and whoever stops a task uses
`cancel_and_wait`, which asks again until the task has stopped.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

ASK_EVERY_S = 0.1


def honour_cancel() -> None:
    """Raise CancelledError if this task was cancelled and something swallowed it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(task: asyncio.Task[Any], every_s: float = ASK_EVERY_S) -> None:
    """Cancel `task` until it is done; what it raised is dropped (it was told to stop)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every_s)
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as never retrieved


class Backoff:
    """Pauses between retries of a lost Redis: doubling from `base_s` up to `cap_s`,
    each drawn at random from half to all of that, so the processes that lost the same
    Redis at the same moment do not all come back at the same moment either."""

    def __init__(self, base_s: float = 0.2, cap_s: float = 5.0) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self.failures = 0

    def next_s(self) -> float:
        """The pause before the next try (and count one more failure)."""
        ceiling = min(self.cap_s, self.base_s * 2 ** self.failures)
        self.failures += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        """After a success: the next failure starts from `base_s` again."""
        self.failures = 0
