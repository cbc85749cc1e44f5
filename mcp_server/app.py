"""The ASGI app: REST, SSE, MCP (Streamable HTTP and legacy SSE), dashboard, probes.

State lives on `app.state`, set up in the lifespan: the `Pipeline` (Redis
clients), the dashboard's session store, and the MCP session manager, which
must run inside the host app's lifespan or the first MCP request fails.

Every request passes, in order: `HostGuard` (421 for an unknown Host, 403
for a foreign Origin), CORS (only when `EMBEDSTREAM_CORS_ORIGINS` is set),
`APIKeyMiddleware` (401; the caller on the scope), `BodyGuard` (415 for an
untyped body, 413 past the byte limits as the body streams in).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute

from mcp_server import (
    batch_routes,
    dashboard,
    embeddings,
    event_routes,
    health,
    job_routes,
    session_routes,
)
from mcp_server import (
    model_routes as models,
)
from mcp_server.auth import APIKeyMiddleware
from mcp_server.body_guard import BodyGuard
from mcp_server.health import PrometheusRegistry, RequestMetrics
from mcp_server.host_guard import HostGuard, HostPolicy
from mcp_server.http_errors import EXCEPTION_HANDLERS
from mcp_server.sessions import SessionStore
from pipeline import Pipeline, Settings, cancel_and_wait

CORS_HEADERS = ["Authorization", "X-API-Key", "Content-Type", "Idempotency-Key",
                "Last-Event-ID", "Mcp-Session-Id", "Mcp-Protocol-Version"]


def middleware_for(settings: Settings) -> list[Middleware]:
    """The app-wide middleware, outermost first."""
    stack = [Middleware(HostGuard, policy=HostPolicy.from_settings(settings))]
    if settings.cors_origins:
        stack.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE"], allow_headers=CORS_HEADERS,
            expose_headers=["Location", "Retry-After", "Mcp-Session-Id"]))
    stack += [Middleware(APIKeyMiddleware, settings=settings),
              Middleware(BodyGuard, settings=settings)]
    return stack


JANITOR_STOP_S = 10.0


def create_app(settings: Settings, *, with_mcp: bool = True) -> Starlette:
    """Build the app for `settings` (which must name a Redis URL)."""
    routes: list[BaseRoute] = [
        *health.routes, *job_routes.routes, *event_routes.routes, *embeddings.routes,
        *models.routes, *session_routes.routes, *dashboard.routes, *batch_routes.routes,
    ]
    # Built before the app, so the MCP tools hold it; opened and closed in the lifespan
    # (its Redis clients connect on first use).
    pipeline = Pipeline(settings)
    mcp_server = None
    if with_mcp:
        from mcp_server.agents import build_mcp, mcp_routes

        mcp_server = build_mcp(settings, pipeline)
        routes += mcp_routes(mcp_server)

    metrics = PrometheusRegistry()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.pipeline = pipeline
        app.state.sessions = SessionStore(pipeline.redis, pipeline.keys, settings.session_ttl_s)
        app.state.metrics = metrics
        stop_janitor = asyncio.Event()
        janitor = asyncio.create_task(pipeline.run_janitor(stop_janitor))
        try:
            if mcp_server is not None:
                from mcp_server.agents import mcp_lifespan

                async with mcp_lifespan(mcp_server):
                    yield
            else:
                yield
        finally:
            stop_janitor.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(janitor), JANITOR_STOP_S)
            if not janitor.done():  # a sweep stuck on an unreachable Redis
                await cancel_and_wait(janitor)
            await pipeline.close()

    app = Starlette(
        routes=routes,
        middleware=[Middleware(RequestMetrics, metrics=metrics), *middleware_for(settings)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    return app
