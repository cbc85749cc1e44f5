"""GET /: the live dashboard, a static page fed by /v1/jobs and the /v1/events feed.

The page and its scripts and styles live in `static/` and are served as they
are (`/static/...`): no build step, nothing from a CDN, so it works offline.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"
PAGE = STATIC / "dashboard.html"


async def index(request: Request) -> Response:
    """The dashboard page."""
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


routes = [Route("/", index, methods=["GET"]),
          Mount("/static", StaticFiles(directory=STATIC), name="static")]
