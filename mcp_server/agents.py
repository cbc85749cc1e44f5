"""The MCP server: the pipeline's tools and job resources for AI agents, on three transports.

    Streamable HTTP   /mcp                 mcp_routes() + mcp_lifespan() in the host app
    legacy HTTP+SSE   /sse, /sse/messages/ mcp_routes(); for clients older than Streamable HTTP
    stdio             `embedstream mcp`    run_stdio()

All three serve one `MCPServer` per process, which calls the process's
`Pipeline`; every process reaches the same Redis, so a job submitted over one
transport (or REST) is visible on the others.

Deliberate choices, so nobody "fixes" them:

- The host app's lifespan must enter `mcp_lifespan()`, which runs the
  Streamable HTTP session manager (the SDK fails the first request with
  "Task group is not initialized" otherwise) and, with it, the job-update
  relay. `mcp_routes()` must be called first: it creates the manager.
- Host and Origin are checked by the host app's `HostGuard`, for every
  route; the SDK's own check is switched off on both transports so there is
  one policy. Bearer API keys are the host app's middleware's business;
  stdio has none (its caller is trusted).
- Tenants: tools and the job resource check the caller through the
  `Pipeline` (another tenant's job is "not found"); listen requests are
  filtered by `OwnedSubscriptions`.
- Tasks (`mcp_server.tasks`): `submit_job` and `embed` called as tasks are
  jobs; the middleware answers the task call, the extension the tasks/* methods,
  and the task notices' feed follower runs in the server's lifespan beside the
  job-update relay.
- Legacy SSE sessions, and Streamable HTTP sessions of handshake-era clients
  (Mcp-Session-Id), live in the process that opened them: several server
  replicas need sticky routing for them. Requests at the 2026-07-28 revision
  are stateless and need nothing of the kind.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import orjson
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ResourceError, ResourceNotFoundError
from mcp.server.transport_security import TransportSecuritySettings
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from mcp_server.job_updates import JOB_URI_TEMPLATE, JobUpdates, OwnedSubscriptions
from mcp_server.payloads import job_json
from mcp_server.tasks import build_tasks
from mcp_server.tool_descriptions import INSTRUCTIONS
from mcp_server.tools import AgentTools, context_caller
from pipeline import InvalidJobId, JobNotFound, Pipeline, PipelineError, Settings
from pipeline.store import redis_for

MCP_PATH = "/mcp"
SSE_PATH = "/sse"
SSE_MESSAGES_PATH = "/sse/messages/"
MAX_BODY_BYTES = 16 * 1024 * 1024
# Host and Origin are checked by HostGuard; the SDK still checks Content-Type and body size.
SDK_HOST_CHECK_OFF = TransportSecuritySettings(enable_dns_rebinding_protection=False)


def build_mcp(settings: Settings, pipeline: Pipeline) -> MCPServer[Any]:
    """The MCP server: tools, the job resource template, and job-update subscriptions."""
    updates = JobUpdates(pipeline)
    tasks = build_tasks(pipeline)

    @asynccontextmanager
    async def lifespan(server: Any) -> AsyncIterator[None]:
        async with updates.running(server), tasks.notices.running(server):
            yield

    mcp: MCPServer[Any] = MCPServer(
        name="embedstream",
        title="embedstream",
        instructions=INSTRUCTIONS,
        version=_version(),
        lifespan=lifespan,
        subscriptions=updates,
        extensions=[tasks.extension],
    )
    AgentTools(settings, pipeline).register(mcp)
    mcp.middleware.append(OwnedSubscriptions(pipeline))
    mcp.middleware.extend([tasks.calls, tasks.listens])

    @mcp.resource(JOB_URI_TEMPLATE, name="job", title="Embedding job",
                  description="A job's status and progress as JSON (what job_status returns).",
                  mime_type="application/json")
    async def job_resource(job_id: str, ctx: Context[Any, Any]) -> str:
        try:
            record = await pipeline.job(job_id, context_caller(ctx))
        except (InvalidJobId, JobNotFound) as error:
            raise ResourceNotFoundError(error.message) from error
        except PipelineError as error:
            raise ResourceError(f"{error.code}: {error.message}") from error
        return orjson.dumps(job_json(record)).decode()

    return mcp


def mcp_routes(mcp: MCPServer[Any]) -> list[BaseRoute]:
    """Routes for Streamable HTTP at /mcp and legacy SSE at /sse (messages at /sse/messages/)."""
    # Called for its side effect: it creates the session manager that mcp_lifespan runs.
    mcp.streamable_http_app(streamable_http_path=MCP_PATH, transport_security=SDK_HOST_CHECK_OFF,
                            max_request_body_size=MAX_BODY_BYTES)
    sse = mcp.sse_app(sse_path=SSE_PATH, message_path=SSE_MESSAGES_PATH,
                      transport_security=SDK_HOST_CHECK_OFF, max_request_body_size=MAX_BODY_BYTES)
    return [
        Route(MCP_PATH, _StreamableHTTP(mcp), methods=["GET", "POST", "DELETE"]),
        # The SSE sub-app routes on the full path, which a Route (unlike a Mount) leaves as is.
        Route(SSE_PATH, sse, methods=["GET"]),
        Route(SSE_MESSAGES_PATH, sse, methods=["POST"]),
    ]


def mcp_lifespan(mcp: MCPServer[Any]) -> AbstractAsyncContextManager[None]:
    """Run the Streamable HTTP session manager (and the job-update relay) in the host's lifespan."""
    return mcp.session_manager.run()


async def run_stdio(settings: Settings) -> None:
    """Serve MCP over stdin/stdout (`embedstream mcp`), against the configured or embedded Redis."""
    with redis_for(settings) as url:
        pipeline = Pipeline(settings.replace(redis_url=url))
        try:
            await build_mcp(pipeline.settings, pipeline).run_stdio_async()
        finally:
            await pipeline.close()


class _StreamableHTTP:
    """The session manager as an ASGI app (a class: Starlette would wrap a function)."""

    def __init__(self, mcp: MCPServer[Any]) -> None:
        self.mcp = mcp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.mcp.session_manager.handle_request(scope, receive, send)


def _version() -> str:
    try:
        return importlib.metadata.version("embedstream")
    except importlib.metadata.PackageNotFoundError:
        return "0"

