"""A cancel that something swallows still stops the task.

On Python 3.11 `asyncio.wait_for`, which redis-py wraps around every socket
write, can swallow a cancel; a worker killed at that moment ran on for ever.
Here the swallowing is done by hand, at a known point.
"""

from __future__ import annotations

import asyncio

import pytest

from pipeline.tasks import cancel_and_wait, honour_cancel

pytestmark = pytest.mark.anyio


async def test_a_loop_that_honours_cancels_stops_after_one_was_swallowed() -> None:
    rounds_after_cancel = 0
    cancelled = asyncio.Event()

    async def loop() -> None:
        nonlocal rounds_after_cancel
        while True:
            honour_cancel()
            if cancelled.is_set():
                rounds_after_cancel += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                cancelled.set()  # swallowed, as a library did

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.03)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)
    assert task in done and task.cancelled()
    assert cancelled.is_set() and rounds_after_cancel == 0


async def test_cancel_and_wait_asks_again_until_the_task_has_stopped() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed == 2:
                    raise
                swallowed += 1

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, every_s=0.01), 2)
    assert task.cancelled() and swallowed == 2


async def test_cancel_and_wait_drops_what_the_task_raised() -> None:
    async def failing() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(failing())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert isinstance(task.exception(), RuntimeError)
