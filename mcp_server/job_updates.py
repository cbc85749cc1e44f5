"""Telling MCP subscribers that a job resource changed.

Jobs change in other processes (workers commit results, any server can
cancel), and every change is on the pipeline's live feed. `JobUpdates` is
the MCP server's subscription bus (the SDK's in-process one, plus a listener
count): while at least one `subscriptions/listen` stream is open, a relay
follows the feed and publishes `ResourceUpdated(embedstream://jobs/<id>)`
for each job event; the SDK's listen handler forwards it to the streams
that asked for that URI. With nobody listening the relay reads nothing.

Deliberate choices, so nobody "fixes" them:

- The relay runs inside the MCP server's lifespan, which the SDK enters once
  for the Streamable HTTP session manager and once per stdio or legacy SSE
  connection. Only the first entrant runs it (the session manager in the
  HTTP app, which outlives every SSE connection); nested entries share it.
- Only the 2026-07-28 `subscriptions/listen` flow is served. MCPServer has
  no handler for the older `resources/subscribe`, so clients that negotiate
  an earlier protocol revision poll `job_status` or re-read the resource.
- The feed sends a `stats` event every couple of seconds, which is when the
  relay notices that the last listener left.
- Tenants: `OwnedSubscriptions` (an MCP server middleware) drops, from a
  `subscriptions/listen` request, the job URIs its caller may not see, before
  the SDK honours it. A job of another tenant is then a URI that never
  fires, which is how the SDK treats a URI that names nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anyio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated, ServerEvent
from redis.exceptions import RedisError

from mcp_server.auth import caller_of
from pipeline import Pipeline, PipelineError
from pipeline.jobs import JOB_ID, Caller, visible

logger = logging.getLogger(__name__)

JOB_URI_TEMPLATE = "embedstream://jobs/{job_id}"
JOB_URI_PREFIX = "embedstream://jobs/"
RETRY_S = 1.0


def job_uri(job_id: str) -> str:
    """The resource URI of a job."""
    return JOB_URI_TEMPLATE.format(job_id=job_id)


class JobUpdates(InMemorySubscriptionBus):
    """The subscription bus, fed from the pipeline's live feed while anyone listens."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self._pipeline = pipeline
        self._listeners_open = 0
        self._wanted = anyio.Event()
        self._relaying = False

    def subscribe(self, listener: Callable[[ServerEvent], None]) -> Callable[[], None]:
        """Register a listen stream's listener; the first one wakes the relay."""
        unsubscribe = super().subscribe(listener)
        self._listeners_open += 1
        self._wanted.set()
        done = False

        def unsubscribe_once() -> None:
            nonlocal done
            if not done:
                done = True
                self._listeners_open -= 1
                unsubscribe()

        return unsubscribe_once

    @asynccontextmanager
    async def running(self, _server: Any = None) -> AsyncIterator[None]:
        """Run the relay for as long as this context is open (shared when nested)."""
        if self._relaying:
            yield
            return
        self._relaying = True
        try:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._relay)
                try:
                    yield
                finally:
                    tasks.cancel_scope.cancel()
        finally:
            self._relaying = False

    async def _relay(self) -> None:
        while True:
            await self._wanted.wait()
            try:
                await self._follow_feed()
            except (PipelineError, RedisError):
                logger.warning("job update relay lost the feed; retrying", exc_info=True)
                await anyio.sleep(RETRY_S)
            except Exception:
                # The relay shares a task group with every MCP session: a bug here
                # must cost subscribers their updates, not end the sessions.
                logger.exception("job update relay failed; retrying")
                await anyio.sleep(RETRY_S)
            if self._listeners_open == 0:
                self._wanted = anyio.Event()

    async def _follow_feed(self) -> None:
        # From now: replaying past events would announce changes nobody missed.
        feed = self._pipeline.follow_feed(replay=0)
        async with aclosing(feed):
            async for event in feed:
                if event.name.startswith("job.") and isinstance(event.data, dict):
                    await self.publish(ResourceUpdated(uri=job_uri(str(event.data.get("id")))))
                if self._listeners_open == 0:
                    return


class OwnedSubscriptions:
    """MCP server middleware: a listen request keeps only the job URIs its caller may see."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
                       ) -> HandlerResult:
        """Rewrite `subscriptions/listen` params; pass everything else through."""
        params = ctx.params
        if ctx.method != "subscriptions/listen" or not isinstance(params, Mapping):
            return await call_next(ctx)
        wanted = params.get("notifications")
        uris = wanted.get("resourceSubscriptions") if isinstance(wanted, Mapping) else None
        if not isinstance(wanted, Mapping) or not isinstance(uris, list):
            return await call_next(ctx)
        caller = caller_of(getattr(ctx.request, "scope", None))
        kept = [uri for uri in uris if await self._may_listen(uri, caller)]
        rewritten = {**params, "notifications": {**wanted, "resourceSubscriptions": kept}}
        return await call_next(dataclasses.replace(ctx, params=rewritten))

    async def _may_listen(self, uri: Any, caller: Caller) -> bool:
        if not isinstance(uri, str) or not uri.startswith(JOB_URI_PREFIX) or caller.admin:
            return True
        job_id = uri[len(JOB_URI_PREFIX):]
        if not JOB_ID.fullmatch(job_id):
            return True  # names no job: it never fires anyway
        return visible(await self._pipeline.owners.owner(job_id), caller)
