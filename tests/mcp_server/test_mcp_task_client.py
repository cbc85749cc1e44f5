"""MCP tasks from the Python SDK's own client on the 2026-07-28 wire (Streamable HTTP).

The SDK's `Client` has no tasks of its own, but it takes client extensions:
`TasksExtension` below is the tasks extension as a client would write it
with the SDK's pieces: a `ResultClaim` for `resultType: "task"` (a model of
the CreateTaskResult, resolved by polling `tasks/get` until the result is
inline), request models for `tasks/get` and `tasks/cancel` (sent with the
session's `send_request`, which stamps the request's capabilities and the
`Mcp-Name` header), and a `NotificationBinding` for `notifications/tasks`.
The SDK's `listen()` takes no `taskIds`, so the listen request is sent with
`send_request` too; its acknowledgement reaches the client's message handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Literal

import anyio
import anyio.abc
import httpx2
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import Client
from mcp.client.extension import ClaimContext, ClientExtension, NotificationBinding, ResultClaim
from mcp.client.session import ClientSession, IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INVALID_PARAMS,
    LATEST_PROTOCOL_VERSION,
    CallToolResult,
    EmptyResult,
    NotificationParams,
    Request,
    RequestParams,
    Result,
    SubscriptionFilter,
    SubscriptionsAcknowledgedNotification,
    SubscriptionsListenRequest,
    SubscriptionsListenRequestParams,
    SubscriptionsListenResult,
)
from pydantic import ConfigDict

from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder
from tests.support.live_server import live_server
from tests.support.mcp_tasks import ALICE, BOB, EXTENSION, TEXTS
from tests.support.workers import running

pytestmark = pytest.mark.anyio

POLL_S = 0.05


class CreatedTask(Result):
    """A CreateTaskResult of the tasks extension: a task in lieu of the tool's result."""

    result_type: Literal["task"] = "task"
    task_id: str
    status: str
    status_message: str | None = None
    created_at: str
    last_updated_at: str
    ttl_ms: int | None
    poll_interval_ms: int | None = None


class TaskState(Result):
    """A task as `tasks/get` answers it: its result inline once completed."""

    task_id: str
    status: str
    created_at: str
    ttl_ms: int | None
    result: dict[str, Any] | None = None


class TaskParams(RequestParams):
    """The params of `tasks/get` and `tasks/cancel`."""

    task_id: str


class GetTask(Request[TaskParams, Literal["tasks/get"]]):
    """`tasks/get`, routed by its task id (`Mcp-Name`) as SEP-2663 asks."""

    method: Literal["tasks/get"] = "tasks/get"
    name_param: ClassVar[str | None] = "taskId"


class CancelTask(Request[TaskParams, Literal["tasks/cancel"]]):
    """`tasks/cancel`, routed by its task id."""

    method: Literal["tasks/cancel"] = "tasks/cancel"
    name_param: ClassVar[str | None] = "taskId"


class TaskNotice(NotificationParams):
    """The params of `notifications/tasks`: the task as `tasks/get` would show it."""

    model_config = ConfigDict(extra="allow")
    task_id: str
    status: str
    result: dict[str, Any] | None = None


class TasksExtension(ClientExtension):
    """The tasks extension for the SDK's client: claims task results, hears task notices."""

    identifier = EXTENSION

    def __init__(self) -> None:
        self.send, self.notices = anyio.create_memory_object_stream[TaskNotice](100)
        self.resolved: list[str] = []

    def claims(self) -> list[ResultClaim[Any]]:
        """A `resultType: "task"` answer to `tools/call`, finished by polling."""
        return [ResultClaim(result_type="task", model=CreatedTask, resolve=self.resolve)]

    def notifications(self) -> list[NotificationBinding[Any]]:
        """`notifications/tasks`, queued for the test to read."""
        return [NotificationBinding(method="notifications/tasks", params_type=TaskNotice,
                                    handler=self.send.send)]

    async def resolve(self, created: CreatedTask, ctx: ClaimContext) -> CallToolResult:
        """The tool's result, once `tasks/get` has it inline."""
        self.resolved.append(created.task_id)
        state = await until_done(ctx.session, created.task_id)
        return CallToolResult.model_validate(state.result)


async def get_task(session: ClientSession, task_id: str) -> TaskState:
    """`tasks/get` through the SDK session."""
    return await session.send_request(GetTask(params=TaskParams(task_id=task_id)), TaskState)


async def until_done(session: ClientSession, task_id: str) -> TaskState:
    """Poll `tasks/get` until the task has ended."""
    with anyio.fail_after(20):
        while (state := await get_task(session, task_id)).status == "working":
            await anyio.sleep(POLL_S)
    return state


@asynccontextmanager
async def sdk_client(url: str, key: str) -> AsyncIterator[tuple[Client, TasksExtension, Acks]]:
    """The SDK's client with the tasks extension, over Streamable HTTP with `key`."""
    tasks, acks = TasksExtension(), Acks()
    async with (tasks.send, tasks.notices, acks.send, acks.received,
                httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"},
                                   timeout=httpx2.Timeout(30, read=300)) as http,
                Client(streamable_http_client(f"{url}/mcp", http_client=http),
                       extensions=[tasks], message_handler=acks.handle) as client):
        assert client.protocol_version == LATEST_PROTOCOL_VERSION == "2026-07-28"
        yield client, tasks, acks


class Acks:
    """Listen acknowledgements the client's message handler received."""

    def __init__(self) -> None:
        self.send: MemoryObjectSendStream[SubscriptionFilter]
        self.send, self.received = anyio.create_memory_object_stream[SubscriptionFilter](10)

    async def handle(self, message: IncomingMessage) -> None:
        """Keep acknowledgements; nothing else is expected here."""
        if isinstance(message, SubscriptionsAcknowledgedNotification):
            await self.send.send(message.params.notifications)


@asynccontextmanager
async def listening(client: Client, acks: Acks, task_ids: list[str]
                    ) -> AsyncIterator[SubscriptionFilter]:
    """A `subscriptions/listen` stream for `task_ids`; yields what the server acknowledged."""
    request = SubscriptionsListenRequest(params=SubscriptionsListenRequestParams(
        notifications=SubscriptionFilter.model_validate({"taskIds": task_ids})))

    async def listen(task_status: anyio.abc.TaskStatus[None]) -> None:
        task_status.started()
        await client.session.send_request(request, SubscriptionsListenResult)

    async with anyio.create_task_group() as group:
        await group.start(listen)
        with anyio.fail_after(10):
            yield await acks.received.receive()
        group.cancel_scope.cancel()


async def next_notice(notices: MemoryObjectReceiveStream[TaskNotice]) -> TaskNotice:
    """The next `notifications/tasks` the client heard."""
    with anyio.fail_after(20):
        return await notices.receive()


async def test_the_sdk_client_creates_polls_and_cancels_tasks_of_its_own_only(
        task_settings: Settings) -> None:
    with live_server(task_settings) as url:
        async with sdk_client(url, ALICE) as (alice, tasks, _), sdk_client(url, BOB) as (bob, _, _):
            # `call_tool` meets a task and, through the extension's claim, polls it to its end.
            async with running(task_settings, HashEmbedder(task_settings)):
                embedded = await alice.call_tool("embed", {"inputs": TEXTS[:2]})
            assert not embedded.is_error and embedded.structured_content is not None
            assert len(embedded.structured_content["embeddings"]) == 2
            assert len(tasks.resolved) == 1  # the answer was a task

            created = await alice.session.call_tool("submit_job", {"inputs": TEXTS},
                                                    allow_claimed=True)
            assert isinstance(created, CreatedTask) and created.status == "working"
            assert created.ttl_ms == task_settings.result_ttl_s * 1000
            for peek in (get_task, until_done):
                with pytest.raises(MCPError) as missing:
                    await peek(bob.session, created.task_id)
                assert missing.value.code == INVALID_PARAMS
                assert "not found" in missing.value.message
            with pytest.raises(MCPError) as refused:
                await bob.session.send_request(
                    CancelTask(params=TaskParams(task_id=created.task_id)), EmptyResult)
            assert refused.value.code == INVALID_PARAMS

            await alice.session.send_request(
                CancelTask(params=TaskParams(task_id=created.task_id)), EmptyResult)
            state = await get_task(alice.session, created.task_id)
            assert state.status == "cancelled" and state.result is None


async def test_the_sdk_client_hears_its_task_end_through_subscriptions_listen(
        task_settings: Settings) -> None:
    with live_server(task_settings) as url:
        async with sdk_client(url, ALICE) as (alice, tasks, acks):
            created = await alice.session.call_tool("embed", {"inputs": TEXTS[:3]},
                                                    allow_claimed=True)
            assert isinstance(created, CreatedTask)
            async with listening(alice, acks, [created.task_id]) as honored:
                assert honored.model_extra == {"taskIds": [created.task_id]}
                now = await next_notice(tasks.notices)
                assert (now.task_id, now.status, now.result) == (created.task_id, "working", None)
                async with running(task_settings, HashEmbedder(task_settings)):
                    ended = await next_notice(tasks.notices)
            assert ended.status == "completed" and ended.result is not None
            assert len(ended.result["structuredContent"]["embeddings"]) == 3
            assert ended.result == (await get_task(alice.session, created.task_id)).result


async def test_the_sdk_client_finishes_a_task_on_a_restarted_server(
        task_settings: Settings) -> None:
    with live_server(task_settings) as url:
        async with sdk_client(url, ALICE) as (alice, _, _):
            created = await alice.session.call_tool("submit_job", {"inputs": TEXTS},
                                                    allow_claimed=True)
    assert isinstance(created, CreatedTask)
    with live_server(task_settings) as url:  # a new server over the same Redis
        async with sdk_client(url, ALICE) as (alice, _, _):
            assert (await get_task(alice.session, created.task_id)).status == "working"
            async with running(task_settings, HashEmbedder(task_settings)):
                state = await until_done(alice.session, created.task_id)
    assert state.status == "completed" and state.result is not None
    assert state.result["structuredContent"] == {
        "job_id": created.task_id, "total": len(TEXTS), "status": "completed",
        "resource": f"embedstream://jobs/{created.task_id}"}
