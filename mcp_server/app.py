"""The ASGI app: REST, SSE, MCP (Streamable HTTP and legacy SSE), dashboard, probes.

State lives on `app.state`, set up in the lifespan: the `Pipeline` (Redis
clients) and the MCP session manager, which must run inside the host app's
lifespan or the first MCP request fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from mcp_server import dashboard, embeddings, health, jobs, models, streams
from mcp_server.auth import APIKeyMiddleware
from mcp_server.errors import EXCEPTION_HANDLERS
from mcp_server.health import Metrics, RequestMetrics
from pipeline.service import Pipeline
from pipeline.settings import Settings


def create_app(settings: Settings, *, with_mcp: bool = True) -> Starlette:
    """Build the app for `settings` (which must name a Redis URL)."""
    routes: list[BaseRoute] = [
        *health.routes, *jobs.routes, *streams.routes, *embeddings.routes, *models.routes,
        *dashboard.routes,
    ]
    mcp_server = None
    if with_mcp:
        from mcp_server.agents import build_mcp, mcp_routes

        app_ref: dict[str, Starlette] = {}
        mcp_server = build_mcp(settings, lambda: app_ref["app"].state.pipeline)
        routes += mcp_routes(mcp_server, settings)

    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.settings = settings
        app.state.pipeline = Pipeline(settings)
        app.state.metrics = metrics
        try:
            if mcp_server is not None:
                from mcp_server.agents import mcp_lifespan

                async with mcp_lifespan(mcp_server):
                    yield
            else:
                yield
        finally:
            await app.state.pipeline.close()

    app = Starlette(
        routes=routes,
        middleware=[Middleware(RequestMetrics, metrics=metrics),
                    Middleware(APIKeyMiddleware, api_keys=settings.api_keys)],
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    if with_mcp:
        app_ref["app"] = app
    return app
