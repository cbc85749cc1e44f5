"""MCP tasks read from the jobs they are: task ids, the Task object of each wire, results.

A task's id is its job's id, so a task lives in Redis with its job: it
survives a server restart, any replica answers for it, and another tenant's
task is "not found" exactly as its job is (`Pipeline.job` checks the caller).
An `embed` task's id is `<job id>.<encoding>`: the suffix says that its result
is `embed`'s answer in that encoding; a plain job id's result is
`submit_job`'s handle.

Deliberate choices, so nobody "fixes" them:

- `finished` waits by reading the job's record every `WAIT_POLL_S`: the
  record is in Redis, so the wait works on whichever replica it lands.
- On 2026-07-28, `failed` is for JSON-RPC errors only: a job that failed
  reads `completed`, its result saying how (as the tool would).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import anyio
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent
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
POLL_INTERVAL_MS = 500
WAIT_POLL_S = 0.2


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
            raise not_found(raw)
        if not encoding:
            return cls(job_id)
        try:
            return cls(job_id, check_encoding(encoding))
        except PipelineError:
            raise not_found(raw) from None

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
                raise not_found(str(task)) from error
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

    async def detailed(self, task: TaskId, record: JobRecord, caller: Caller) -> dict[str, Any]:
        """The task as 2026-07-28's `tasks/get` shows it: with its result inline once done."""
        shown = self.task(task, record, modern=True)
        if record.finished and record.status is not JobStatus.CANCELLED:
            shown["result"] = await self.result(task, record, caller)
        return shown

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


def declares(params: Mapping[str, Any]) -> bool:
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


def caller_of_request(ctx: ServerRequestContext[Any, Any]) -> Caller:
    """The caller the HTTP middleware put on the request (stdio's is trusted)."""
    return caller_of(getattr(ctx.request, "scope", None))


def not_found(task_id: str) -> MCPError:
    """The JSON-RPC error for a task that does not exist, has expired or is another's."""
    return MCPError(code=INVALID_PARAMS, message=f"Task not found: {task_id}")


def _internal(error: PipelineError) -> MCPError:
    return MCPError(code=INVALID_PARAMS if error.code.startswith("invalid") else -32603,
                    message=f"{error.code}: {error.message}")
