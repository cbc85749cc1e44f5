"""`subscriptions/listen` with `taskIds`: the `notifications/tasks` of 2026-07-28's tasks extension.

SEP-2663 adds `taskIds` to a listen request's filter: the server acknowledges
the ids it agreed to, then sends `notifications/tasks` on that stream, each
the task as `tasks/get` would show it at that moment (its result inline once
done). `TaskListens`, a server middleware in front of the SDK's own listen
handler (which goes on serving the rest of the filter: job resources, its
limits, its graceful close):

- refuses task ids from a request that does not declare the extension
  (`MISSING_REQUIRED_CLIENT_CAPABILITY`, naming the extension, as SEP-2663 says);
- keeps the ids of tasks the caller may see, at most `MAX_WATCHED_TASKS`:
  another tenant's task, or an unknown id, is left out of the
  acknowledgement and never fires (as `OwnedSubscriptions` does for job URIs);
- once the acknowledgement is out, sends each kept task's state at once, then
  each change, until the stream ends (`mcp_server.task_notices`).

Deliberate choices, so nobody "fixes" them:

- The SDK builds the acknowledgement from its own filter model, which drops
  keys it does not know, so the kept ids are added to it in flight
  (`_AcknowledgingTasks`, the listen request's session with one method
  wrapped): the acknowledgement stays the stream's first frame, and nothing
  of the SDK's handler is copied here.
- A task's current state is sent when the stream opens: a client that polled
  `tasks/get` and then listens learns of a change that fell between the two.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any, cast

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import SUBSCRIPTION_ID_META_KEY
from mcp_types import (
    MISSING_REQUIRED_CLIENT_CAPABILITY,
    Notification,
    RequestId,
    ServerNotification,
    SubscriptionFilter,
    SubscriptionsAcknowledgedNotification,
)
from mcp_types.jsonrpc import INVALID_PARAMS

from mcp_server.task_notices import MAX_WATCHED_TASKS, TaskNotices, Watched, Watcher
from mcp_server.task_store import EXTENSION, TaskId, TaskStore, caller_of_request, declares
from pipeline.jobs import Caller

TASK_IDS = "taskIds"


class TaskListens:
    """Server middleware: serve `taskIds` in `subscriptions/listen`; pass everything else on."""

    def __init__(self, store: TaskStore, notices: TaskNotices) -> None:
        self.store = store
        self.notices = notices

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
                       ) -> HandlerResult:
        """Run the SDK's listen handler with task notifications beside it on its stream."""
        params = ctx.params if isinstance(ctx.params, Mapping) else {}
        wanted = params.get("notifications")
        if (ctx.method != "subscriptions/listen" or not isinstance(wanted, Mapping)
                or TASK_IDS not in wanted):
            return await call_next(ctx)
        if not declares(params):
            raise MCPError(code=MISSING_REQUIRED_CLIENT_CAPABILITY,
                           message=f"Missing required client capability: {TASK_IDS} needs the "
                                   f"{EXTENSION} extension in the request's capabilities",
                           data={"requiredCapabilities": {"extensions": {EXTENSION: {}}}})
        kept = await self._owned(wanted[TASK_IDS], caller_of_request(ctx))
        acked = anyio.Event()
        session = _AcknowledgingTasks(ctx.session, [str(watched.task) for watched in kept], acked)
        rest = {**params, "notifications": {k: v for k, v in wanted.items() if k != TASK_IDS}}
        watcher = Watcher(partial(_send, ctx.session, ctx.request_id), modern=True,
                          meta={SUBSCRIPTION_ID_META_KEY: ctx.request_id})
        async with anyio.create_task_group() as group:
            group.start_soon(self._deliver, watcher, kept, acked)
            try:
                result = await call_next(dataclasses.replace(
                    ctx, session=cast(ServerSession, session), params=rest))
            finally:
                group.cancel_scope.cancel()
        return result

    async def _owned(self, raw: Any, caller: Caller) -> list[Watched]:
        """The tasks of `raw` the caller may see, each once, at most `MAX_WATCHED_TASKS`."""
        if not isinstance(raw, list) or not all(isinstance(task_id, str) for task_id in raw):
            raise MCPError(code=INVALID_PARAMS,
                           message=f"notifications.{TASK_IDS} must be a list of task id strings")
        kept: list[Watched] = []
        for task_id in dict.fromkeys(raw):
            if len(kept) == MAX_WATCHED_TASKS:
                break
            try:
                task = TaskId.parse(task_id)
                await self.store.job(task, caller)
            except MCPError as error:
                if error.code != INVALID_PARAMS:
                    raise
                continue  # unknown, expired or another's: not honoured
            kept.append(Watched(task, caller))
        return kept

    async def _deliver(self, watcher: Watcher, kept: list[Watched], acked: anyio.Event) -> None:
        await acked.wait()
        await self.notices.serve(watcher, kept)


class _AcknowledgingTasks:
    """A listen request's session whose acknowledgement also lists the task ids kept."""

    def __init__(self, session: ServerSession, task_ids: list[str], acked: anyio.Event) -> None:
        self._session = session
        self._task_ids = task_ids
        self._acked = acked

    async def send_notification(self, notification: ServerNotification,
                                related_request_id: RequestId | None = None) -> None:
        """Send as the session would; the acknowledgement with `taskIds` added."""
        if not isinstance(notification, SubscriptionsAcknowledgedNotification):
            await self._session.send_notification(notification, related_request_id)
            return
        honored = notification.params.notifications
        if self._task_ids:
            honored = SubscriptionFilter.model_validate(
                {**honored.model_dump(by_alias=True, exclude_none=True), TASK_IDS: self._task_ids})
        amended = notification.model_copy(update={
            "params": notification.params.model_copy(update={"notifications": honored})})
        await self._session.send_notification(amended, related_request_id)
        self._acked.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class _Notice(Notification[dict[str, Any], str]):
    """A notification the SDK has no model for (`notifications/tasks`)."""


async def _send(session: ServerSession, stream: RequestId | None, method: str,
                params: dict[str, Any]) -> None:
    """Send on the listen request's own stream (the SDK sends any notification model)."""
    notice = cast(ServerNotification, _Notice(method=method, params=params))
    await session.send_notification(notice, related_request_id=stream)
