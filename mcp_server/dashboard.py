"""GET /: the live dashboard, one static page fed by the /v1/events SSE feed."""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

PAGE = Path(__file__).parent / "static" / "dashboard.html"


async def index(request: Request) -> Response:
    """The dashboard page."""
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


routes = [Route("/", index, methods=["GET"])]
