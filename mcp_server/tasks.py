"""MCP tasks: `submit_job` and `embed` called as tasks, where a task is a job.

Two wires, one store (`mcp_server.task_store`):

    2025-11-25   capability `tasks`; a `tools/call` with `params.task` answers a
                 CreateTaskResult; tasks/get, tasks/result (waits), tasks/list,
                 tasks/cancel; `notifications/tasks/status` (and progress under
                 the call's token) to the connection that made the task
    2026-07-28   extension `io.modelcontextprotocol/tasks` (SEP-2663): a client that
                 declares it in its request's capabilities gets `resultType: "task"`
                 for those two tools; tasks/get (the result inline once done),
                 tasks/cancel and tasks/update (acknowledged); `notifications/tasks`
                 on a `subscriptions/listen` stream that names `taskIds`

`tasks/list` lists the caller's jobs (every job is a task), under their
plain ids. Notifications come from `mcp_server.task_notices` (one follower
of the live feed per process) and `mcp_server.task_listens`.

Deliberate choices, so nobody "fixes" them:

- The SDK (2.x) ships the tasks types but no runtime, so this is ours, built
  on its low-level pieces: `TaskCalls` is a server middleware (a CreateTaskResult
  is not a CallToolResult, which the SDK's result sieve would reject on the
  2025-11-25 wire, so the middleware answers before it); `TasksExtension`
  serves the tasks/* methods and advertises the 2026-07-28 extension.
- The task is created by running the real `submit_job` tool (an `embed` task
  becomes a `submit_job` call with the same texts and options), so both take
  the same validation and tool errors; a tool error is answered as such, and
  no task is made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, GetTaskRequestParams, PaginatedRequestParams, TextContent
from mcp_types.jsonrpc import INVALID_PARAMS

from mcp_server.task_listens import TaskListens
from mcp_server.task_notices import TaskNotices, Watched
from mcp_server.task_store import (
    EXTENSION,
    LEGACY_WIRE,
    RELATED_TASK,
    TaskId,
    TaskStore,
    caller_of_request,
    declares,
)
from pipeline import Pipeline, PipelineError
from pipeline.jobs import Caller, check_encoding

TASK_TOOLS = ("submit_job", "embed")
LIST_PAGE = 50
LEGACY_CAPABILITY: dict[str, Any] = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}


class TasksExtension(Extension):
    """The tasks/* methods on both wires, and the 2026-07-28 extension's advertisement."""

    identifier = EXTENSION

    def __init__(self, store: TaskStore) -> None:
        self.store = store

    def methods(self) -> list[MethodBinding]:
        """tasks/get, tasks/result, tasks/list, tasks/cancel and tasks/update."""
        return [MethodBinding("tasks/get", GetTaskRequestParams, self.get),
                MethodBinding("tasks/result", GetTaskRequestParams, self.result,
                              frozenset({LEGACY_WIRE})),
                MethodBinding("tasks/list", PaginatedRequestParams, self.list,
                              frozenset({LEGACY_WIRE})),
                MethodBinding("tasks/cancel", GetTaskRequestParams, self.cancel),
                MethodBinding("tasks/update", GetTaskRequestParams, self.update)]

    async def get(self, ctx: ServerRequestContext[Any, Any], params: GetTaskRequestParams
                  ) -> HandlerResult:
        """The task now; on 2026-07-28 with its result inline once it has one."""
        task, caller, modern = _request(ctx, params)
        record = await self.store.job(task, caller)
        if modern:
            return await self.store.detailed(task, record, caller)
        return self.store.task(task, record, modern=False)

    async def result(self, ctx: ServerRequestContext[Any, Any], params: GetTaskRequestParams
                     ) -> HandlerResult:
        """The tool's CallToolResult, once the task has ended (2025-11-25)."""
        task, caller, _ = _request(ctx, params)
        record = await self.store.finished(task, caller)
        reply = await self.store.result(task, record, caller)
        return {**reply, "_meta": {RELATED_TASK: {"taskId": str(task)}}}

    async def list(self, ctx: ServerRequestContext[Any, Any], params: PaginatedRequestParams
                   ) -> HandlerResult:
        """The caller's own tasks (its jobs), newest first, a page at a time (2025-11-25)."""
        caller = caller_of_request(ctx)
        try:
            page = await self.store.pipeline.list_jobs(caller, limit=LIST_PAGE,
                                                       cursor=params.cursor)
        except PipelineError as error:
            raise MCPError(code=INVALID_PARAMS, message=error.message) from error
        tasks = [self.store.task(TaskId(job.id), job, modern=False) for job in page.jobs]
        return {"tasks": tasks, **({"nextCursor": page.next_cursor} if page.next_cursor else {})}

    async def cancel(self, ctx: ServerRequestContext[Any, Any], params: GetTaskRequestParams
                     ) -> HandlerResult:
        """Cancel the task's job: the task after (2025-11-25), an acknowledgement (2026-07-28)."""
        task, caller, modern = _request(ctx, params)
        record = await self.store.job(task, caller)
        if record.finished and not modern:
            raise MCPError(code=INVALID_PARAMS, message=f"Cannot cancel task {task}: it is "
                                                        f"already {record.status.value}")
        if not record.finished:
            record = await self.store.pipeline.cancel(task.job_id, caller)
        return {} if modern else self.store.task(task, record, modern=False)

    async def update(self, ctx: ServerRequestContext[Any, Any], params: GetTaskRequestParams
                     ) -> HandlerResult:
        """Acknowledge: a job never waits for input, so there is nothing to update."""
        task, caller, _ = _request(ctx, params)
        await self.store.job(task, caller)
        return {}


class TaskCalls:
    """Server middleware: `tools/call` as a task, the 2025-11-25 capability and tool flags."""

    def __init__(self, store: TaskStore, notices: TaskNotices) -> None:
        self.store = store
        self.notices = notices

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
                       ) -> HandlerResult:
        """Answer task calls; mark up the handshake and the tool list of 2025-11-25."""
        params = ctx.params if isinstance(ctx.params, Mapping) else {}
        if ctx.method == "tools/call" and params.get("name") in TASK_TOOLS:
            modern = ctx.protocol_version != LEGACY_WIRE
            if (params.get("task") is not None and not modern) or (modern and declares(params)):
                return await self._create(ctx, params, call_next, modern=modern)
        result = await call_next(ctx)
        if not isinstance(result, dict):
            return result
        if ctx.method == "initialize" and result.get("protocolVersion") == LEGACY_WIRE:
            result["capabilities"] = {**result.get("capabilities", {}),
                                      "tasks": LEGACY_CAPABILITY}
        elif ctx.method == "tools/list" and ctx.protocol_version == LEGACY_WIRE:
            for tool in result.get("tools", []):
                if tool.get("name") in TASK_TOOLS:
                    tool["execution"] = {"taskSupport": "optional"}
        return result

    async def _create(self, ctx: ServerRequestContext[Any, Any], params: Mapping[str, Any],
                      call_next: CallNext, *, modern: bool) -> HandlerResult:
        """Submit the job through `submit_job`; answer the task, or the tool's error."""
        arguments = dict(params.get("arguments") or {})
        encoding = arguments.pop("encoding", "float") if params["name"] == "embed" else None
        limit = self.store.pipeline.settings.embed_max_texts
        if encoding is not None and len(arguments.get("inputs") or ()) > limit:
            return CallToolResult(content=[TextContent(
                type="text", text=f"payload_too_large: embed takes at most {limit} texts per "
                                  "call; use submit_job for bulk work")], is_error=True)
        call = {key: value for key, value in params.items() if key != "task"}
        result = await call_next(dataclasses.replace(
            ctx, params={**call, "name": "submit_job", "arguments": arguments}))
        if not isinstance(result, dict):
            return result
        content = result.get("structuredContent")
        if not isinstance(content, dict) or result.get("isError"):
            return result
        task = TaskId(str(content["job_id"]), encoding and check_encoding(str(encoding)))
        return await self._answer(ctx, task, _progress_token(params), modern=modern)

    async def _answer(self, ctx: ServerRequestContext[Any, Any], task: TaskId,
                      progress_token: str | int | None, *, modern: bool) -> HandlerResult:
        """The CreateTaskResult; on 2025-11-25 the connection watches the task from now."""
        caller = caller_of_request(ctx)
        record = await self.store.job(task, caller)
        shown = self.store.task(task, record, modern=modern)
        if modern:
            return {"resultType": "task", **shown}
        if not record.finished:
            await self.notices.watch_for_connection(
                ctx.session, Watched(task, caller, shown["status"], progress_token))
        return {"task": shown}


@dataclasses.dataclass(frozen=True)
class Tasks:
    """The tasks runtime, for `build_mcp` to install on the server."""

    extension: TasksExtension
    calls: TaskCalls
    listens: TaskListens
    notices: TaskNotices


def build_tasks(pipeline: Pipeline) -> Tasks:
    """The extension, the middleware and the notices, over one store of the pipeline's jobs."""
    store = TaskStore(pipeline, pipeline.settings.result_ttl_s * 1000)
    notices = TaskNotices(store)
    return Tasks(TasksExtension(store), TaskCalls(store, notices),
                 TaskListens(store, notices), notices)


def _progress_token(params: Mapping[str, Any]) -> str | int | None:
    """The call's progressToken, which stays valid for the task's lifetime (2025-11-25)."""
    meta = params.get("_meta")
    token = meta.get("progressToken") if isinstance(meta, Mapping) else None
    return token if isinstance(token, str | int) and not isinstance(token, bool) else None


def _request(ctx: ServerRequestContext[Any, Any], params: GetTaskRequestParams
             ) -> tuple[TaskId, Caller, bool]:
    return TaskId.parse(params.task_id), caller_of_request(ctx), ctx.protocol_version != LEGACY_WIRE


