"""MCP tasks: `submit_job` and `embed` called as tasks, where a task is a job.

Two wires, one store:

    2025-11-25   capability `tasks`; a `tools/call` with `params.task` answers a
                 CreateTaskResult; tasks/get, tasks/result (waits), tasks/list,
                 tasks/cancel
    2026-07-28   extension `io.modelcontextprotocol/tasks` (SEP-2663): a client that
                 declares it in its request's capabilities gets `resultType: "task"`
                 for those two tools; tasks/get (the result inline once done),
                 tasks/cancel and tasks/update (acknowledged)

A task's id is its job's id, so a task lives in Redis with its job: it
survives a server restart, any replica answers for it, and another tenant's
task is "not found" exactly as its job is (`Pipeline.job` checks the caller).
An `embed` task's id is `<job id>.<encoding>`: the suffix says that its result
is `embed`'s answer in that encoding; a plain job id's result is
`submit_job`'s handle. `tasks/list` lists the caller's jobs (every job is a
task), under their plain ids.

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
- `tasks/result` waits by reading the job's record every `WAIT_POLL_S`: the
  record is in Redis, so the wait works on whichever replica it lands.
- On 2026-07-28, `failed` is for JSON-RPC errors only: a job that failed
  reads `completed`, its result saying how (as the tool would).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.extension import Extension, MethodBinding
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, GetTaskRequestParams, PaginatedRequestParams, TextContent
from mcp_types.jsonrpc import INVALID_PARAMS

from mcp_server.auth import caller_of
from mcp_server.job_updates import job_uri
from mcp_server.tools import embed_reply, structured
from pipeline import Pipeline, PipelineError
from pipeline.jobs import JOB_ID, MAX_PAGE, Caller, Embeddings, JobRecord, JobStatus, check_encoding

EXTENSION = "io.modelcontextprotocol/tasks"
CLIENT_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
RELATED_TASK = "io.modelcontextprotocol/related-task"
LEGACY_WIRE = "2025-11-25"
TASK_TOOLS = ("submit_job", "embed")
POLL_INTERVAL_MS = 500
WAIT_POLL_S = 0.2
LIST_PAGE = 50
LEGACY_CAPABILITY: dict[str, Any] = {"list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}


@dataclasses.dataclass(frozen=True)
class TaskId:
    """A task id: its job, and for an `embed` task the encoding of its result."""

    job_id: str
    encoding: str | None = None

    @classmethod
    def parse(cls, raw: str) -> TaskId:
        """The task `raw` names; a JSON-RPC error (as for an unknown task) if none."""
        job_id, _, encoding = raw.partition(".")
        if not JOB_ID.fullmatch(job_id):
            raise _not_found(raw)
        if not encoding:
            return cls(job_id)
        try:
            return cls(job_id, check_encoding(encoding))
        except PipelineError:
            raise _not_found(raw) from None

    def __str__(self) -> str:
        return self.job_id if self.encoding is None else f"{self.job_id}.{self.encoding}"


class TaskStore:
    """Tasks read from, and results made from, the jobs they are."""

    def __init__(self, pipeline: Pipeline, ttl_ms: int) -> None:
        self.pipeline = pipeline
        self.ttl_ms = ttl_ms

    async def job(self, task: TaskId, caller: Caller) -> JobRecord:
        """The task's job, if the caller may see it; else "not found"."""
        try:
            return await self.pipeline.job(task.job_id, caller)
        except PipelineError as error:
            if error.code == "job_not_found":
                raise _not_found(str(task)) from error
            raise _internal(error) from error

    async def finished(self, task: TaskId, caller: Caller) -> JobRecord:
        """The task's job once it has ended (waiting for that)."""
        record = await self.job(task, caller)
        while not record.finished:
            await anyio.sleep(WAIT_POLL_S)
            record = await self.job(task, caller)
        return record

    async def result(self, task: TaskId, record: JobRecord, caller: Caller) -> dict[str, Any]:
        """What the tool would have answered, as wire JSON, for a finished job."""
        if task.encoding is None:
            reply = structured({"job_id": record.id, "total": record.total,
                                "status": record.status.value, "resource": job_uri(record.id)})
        else:
            reply = await self._embedded(task.encoding, record, caller)
        return reply.model_dump(by_alias=True, exclude_none=True)

    async def _embedded(self, encoding: str, record: JobRecord, caller: Caller
                        ) -> CallToolResult:
        rows: list[Any] = []
        cursor: str | None = None
        try:
            while True:
                page = await self.pipeline.results(record.id, cursor, MAX_PAGE, encoding,
                                                   caller=caller)
                rows += page.rows
                cursor = page.next_cursor
                if cursor is None:
                    return embed_reply(Embeddings.of_job(record, rows), encoding, record.chunk)
        except PipelineError as error:
            return CallToolResult(content=[TextContent(type="text",
                                                       text=f"{error.code}: {error.message}")],
                                  is_error=True)

    def task(self, task: TaskId, record: JobRecord, *, modern: bool) -> dict[str, Any]:
        """The Task object of either wire (2026-07-28's fields end in `Ms`)."""
        updated = record.finished_at or record.started_at or record.created_at
        shown = {"taskId": str(task), "status": _status(record.status, modern=modern),
                 "statusMessage": f"job {record.status.value}: {record.done} of {record.total} "
                                  f"texts embedded, {record.failed} failed",
                 "createdAt": record.created_at, "lastUpdatedAt": updated}
        if modern:
            return {**shown, "ttlMs": self.ttl_ms, "pollIntervalMs": POLL_INTERVAL_MS}
        return {**shown, "ttl": self.ttl_ms, "pollInterval": POLL_INTERVAL_MS}


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
        shown = self.store.task(task, record, modern=modern)
        if modern and record.finished and record.status is not JobStatus.CANCELLED:
            shown["result"] = await self.store.result(task, record, caller)
        return shown

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
        caller = _caller(ctx)
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

    def __init__(self, store: TaskStore) -> None:
        self.store = store

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
                       ) -> HandlerResult:
        """Answer task calls; mark up the handshake and the tool list of 2025-11-25."""
        params = ctx.params if isinstance(ctx.params, Mapping) else {}
        if ctx.method == "tools/call" and params.get("name") in TASK_TOOLS:
            modern = ctx.protocol_version != LEGACY_WIRE
            if (params.get("task") is not None and not modern) or (modern and _declares(params)):
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
        record = await self.store.job(task, _caller(ctx))
        shown = self.store.task(task, record, modern=modern)
        return {"resultType": "task", **shown} if modern else {"task": shown}


def build_tasks(pipeline: Pipeline) -> tuple[TasksExtension, TaskCalls]:
    """The extension and the middleware, over one store of the pipeline's jobs."""
    store = TaskStore(pipeline, pipeline.settings.result_ttl_s * 1000)
    return TasksExtension(store), TaskCalls(store)


def _declares(params: Mapping[str, Any]) -> bool:
    """Whether a 2026-07-28 request's capabilities include the tasks extension."""
    meta = params.get("_meta")
    capabilities = meta.get(CLIENT_CAPABILITIES) if isinstance(meta, Mapping) else None
    extensions = capabilities.get("extensions") if isinstance(capabilities, Mapping) else None
    return isinstance(extensions, Mapping) and EXTENSION in extensions


def _status(status: JobStatus, *, modern: bool) -> str:
    if status is JobStatus.COMPLETED or (modern and status is JobStatus.FAILED):
        return "completed"
    if status in (JobStatus.FAILED, JobStatus.CANCELLED):
        return status.value
    return "working"


def _caller(ctx: ServerRequestContext[Any, Any]) -> Caller:
    return caller_of(getattr(ctx.request, "scope", None))


def _request(ctx: ServerRequestContext[Any, Any], params: GetTaskRequestParams
             ) -> tuple[TaskId, Caller, bool]:
    return TaskId.parse(params.task_id), _caller(ctx), ctx.protocol_version != LEGACY_WIRE


def _not_found(task_id: str) -> MCPError:
    return MCPError(code=INVALID_PARAMS, message=f"Task not found: {task_id}")


def _internal(error: PipelineError) -> MCPError:
    return MCPError(code=INVALID_PARAMS if error.code.startswith("invalid") else -32603,
                    message=f"{error.code}: {error.message}")
