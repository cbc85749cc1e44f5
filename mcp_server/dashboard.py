"""GET /: the live dashboard, a static page fed by /v1/jobs and the /v1/events feed.

The page and its scripts and styles live in `static/` and are served as they
are (`/static/...`): no build step, nothing from a CDN, so it works offline.

With API keys on, a browser that has not signed in gets the sign-in page
instead (`static/signin.html`, self-contained: it needs no other open path).
It posts the key as JSON to `POST /v1/session`, which sets the session
cookie, and reloads. The dashboard page then authenticates its GETs and its
EventSource with that cookie; for a state-changing request (cancelling a
job, signing out) it sends `X-CSRF-Token` with the token `GET /v1/session`
returns.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mcp_server.auth import NOBODY, caller_of

STATIC = Path(__file__).parent / "static"
PAGE = STATIC / "dashboard.html"
SIGN_IN = STATIC / "signin.html"
# The sign-in page is never framed (clickjacking) and never cached.
SIGN_IN_HEADERS = {"X-Frame-Options": "DENY", "Cache-Control": "no-store",
                   "Content-Security-Policy": "frame-ancestors 'none'",
                   "Referrer-Policy": "no-referrer"}


async def index(request: Request) -> Response:
    """The dashboard page, or the sign-in page for a browser not signed in."""
    if caller_of(request.scope) is NOBODY:
        return HTMLResponse(SIGN_IN.read_text(encoding="utf-8"), headers=SIGN_IN_HEADERS)
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


routes = [Route("/", index, methods=["GET"]),
          Mount("/static", StaticFiles(directory=STATIC), name="static")]
