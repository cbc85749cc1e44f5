"""Task notifications as the specs write them (raw JSON-RPC with httpx).

2025-11-25: the connection that made a task hears `notifications/tasks/status`
on its standalone (GET) stream when the task ends, and `notifications/progress`
under the call's progressToken while it runs; nothing is watched once the
session ends. 2026-07-28: `taskIds` in `subscriptions/listen` need the tasks
extension declared, and another tenant's task id is not honoured.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.abc
import orjson
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream
from mcp_types import MISSING_REQUIRED_CLIENT_CAPABILITY

from mcp_server import tasks as tasks_module
from mcp_server.task_notices import TaskNotices
from mcp_server.task_store import TaskStore
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder
from tests.support.live_server import live_server
from tests.support.mcp_tasks import BOB, EXTENSION, LEGACY, MODERN, TEXTS, Wire, client
from tests.support.workers import running

pytestmark = pytest.mark.anyio

TASK_FIELDS = {"taskId", "status", "statusMessage", "createdAt", "lastUpdatedAt", "ttl",
               "pollInterval"}


@pytest.fixture
def notices(monkeypatch: pytest.MonkeyPatch) -> list[TaskNotices]:
    """The servers' task notices, as each server builds them (to see what they watch)."""
    made: list[TaskNotices] = []

    class Recorded(TaskNotices):
        def __init__(self, store: TaskStore) -> None:
            super().__init__(store)
            made.append(self)

    monkeypatch.setattr(tasks_module, "TaskNotices", Recorded)
    return made


@asynccontextmanager
async def standalone(wire: Wire) -> AsyncIterator[MemoryObjectReceiveStream[dict[str, Any]]]:
    """The session's GET stream, as the JSON-RPC messages it carries."""
    send, receive = anyio.create_memory_object_stream[dict[str, Any]](100)

    async def read(task_status: anyio.abc.TaskStatus[None]) -> None:
        headers = {**wire.headers, "Accept": "text/event-stream"}
        async with wire.http.stream("GET", "/mcp", headers=headers) as reply:
            assert reply.status_code == 200, await reply.aread()
            task_status.started()
            async for line in reply.aiter_lines():
                if line.startswith("data:") and line[5:].strip():
                    await send.send(orjson.loads(line[5:]))

    with send, receive:
        async with anyio.create_task_group() as group:
            await group.start(read)
            yield receive
            group.cancel_scope.cancel()


async def until(messages: MemoryObjectReceiveStream[dict[str, Any]], method: str,
                **params: Any) -> list[dict[str, Any]]:
    """The messages read up to the first of `method` whose params include `params` (last)."""
    seen: list[dict[str, Any]] = []
    with anyio.fail_after(20):
        async for message in messages:
            seen.append(message)
            if message.get("method") == method and params.items() <= message["params"].items():
                return seen
    raise AssertionError(f"the stream ended before {method}: {seen}")


async def test_the_2025_11_25_connection_hears_its_task_end_and_its_progress(
        task_settings: Settings) -> None:
    with live_server(task_settings) as url:
        async with client(url, LEGACY) as wire, standalone(wire) as messages:
            created = (await wire.result("tools/call", name="submit_job", task={"ttl": 60000},
                                         arguments={"inputs": TEXTS},
                                         _meta={"progressToken": "p-1"}))["task"]
            assert created["status"] == "working"  # no worker yet
            async with running(task_settings, HashEmbedder(task_settings)):
                seen = await until(messages, "notifications/tasks/status",
                                   taskId=created["taskId"])
            ended = seen[-1]["params"]
            assert set(ended) == TASK_FIELDS and ended["status"] == "completed"
            assert ended == await wire.result("tasks/get", taskId=created["taskId"])
            assert (ended["createdAt"], ended["ttl"]) == (created["createdAt"], created["ttl"])

    # Progress came under the call's token, tied to the task, up to the total, before the end.
    progress = [m["params"] for m in seen if m.get("method") == "notifications/progress"]
    assert progress and {p["progressToken"] for p in progress} == {"p-1"}
    assert progress[-1]["progress"] == progress[-1]["total"] == len(TEXTS)
    assert progress[0]["_meta"] == {"io.modelcontextprotocol/related-task": {
        "taskId": created["taskId"]}}


async def test_a_cancelled_task_is_told_and_a_closed_session_watches_nothing(
        task_settings: Settings, notices: list[TaskNotices]) -> None:
    with live_server(task_settings) as url:
        async with client(url, LEGACY) as wire:
            async with standalone(wire) as messages:
                first, second = [(await wire.result(
                    "tools/call", name="submit_job", task={},
                    arguments={"inputs": TEXTS}))["task"]["taskId"] for _ in range(2)]
                await wire.result("tasks/cancel", taskId=first)
                told = (await until(messages, "notifications/tasks/status", taskId=first))[-1]
                assert told["params"]["status"] == "cancelled"
            [watching] = notices
            assert set(watching.watchers) == {second}  # still working, still watched
            closed = await wire.http.delete("/mcp", headers=wire.headers)
            assert closed.status_code == 200
            with anyio.fail_after(10):  # the follower stops at the feed's next stats tick
                while watching.watchers or watching.following:
                    await anyio.sleep(0.05)


@asynccontextmanager
async def listen(wire: Wire, notifications: dict[str, Any], *, declare: bool = True
                 ) -> AsyncIterator[MemoryObjectReceiveStream[dict[str, Any]]]:
    """A 2026-07-28 `subscriptions/listen` stream, as the JSON-RPC messages it carries."""
    extensions: dict[str, Any] = {EXTENSION: {}} if declare else {}
    body = {"jsonrpc": "2.0", "id": "listen-1", "method": "subscriptions/listen", "params": {
        "notifications": notifications, "_meta": {
            "io.modelcontextprotocol/clientCapabilities": {"extensions": extensions},
            "io.modelcontextprotocol/protocolVersion": MODERN}}}
    headers = {**wire.headers, "Mcp-Method": "subscriptions/listen"}
    send, receive = anyio.create_memory_object_stream[dict[str, Any]](100)

    async def read(task_status: anyio.abc.TaskStatus[None]) -> None:
        async with send, wire.http.stream("POST", "/mcp", headers=headers, json=body) as reply:
            task_status.started()
            if reply.headers["content-type"].startswith("application/json"):
                await send.send(orjson.loads(await reply.aread()))
                return
            async for line in reply.aiter_lines():
                if line.startswith("data:") and line[5:].strip():
                    await send.send(orjson.loads(line[5:]))

    with receive:
        async with anyio.create_task_group() as group:
            await group.start(read)
            yield receive
            group.cancel_scope.cancel()


async def test_2026_07_28_task_ids_need_the_extension_and_the_callers_own_tasks(
        task_settings: Settings) -> None:
    with live_server(task_settings) as url:
        async with client(url, MODERN) as alice, client(url, MODERN, BOB) as bob:
            task_id = (await alice.result("tools/call", name="submit_job",
                                          arguments={"inputs": TEXTS}))["taskId"]
            async with listen(alice, {"taskIds": [task_id]}, declare=False) as frames:
                with anyio.fail_after(10):
                    refused = await frames.receive()
            assert refused["error"]["code"] == MISSING_REQUIRED_CLIENT_CAPABILITY
            assert refused["error"]["data"] == {
                "requiredCapabilities": {"extensions": {EXTENSION: {}}}}

            others = {"taskIds": [task_id, "not-a-task"], "toolsListChanged": True}
            async with listen(bob, others) as frames:
                with anyio.fail_after(10):
                    ack = await frames.receive()
            assert ack["method"] == "notifications/subscriptions/acknowledged"
            assert ack["params"]["notifications"] == {"toolsListChanged": True}

            async with listen(alice, {"taskIds": [task_id]}) as frames:
                with anyio.fail_after(10):
                    ack, first = await frames.receive(), await frames.receive()
            assert ack["params"]["notifications"] == {"taskIds": [task_id]}
            assert first["method"] == "notifications/tasks"
            assert first["params"]["_meta"] == {
                "io.modelcontextprotocol/subscriptionId": "listen-1"}
            assert first["params"]["status"] == "working"
            assert first["params"]["ttlMs"] > 0 and "result" not in first["params"]
