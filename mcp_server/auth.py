"""Bearer API keys, checked before any route (REST, SSE, MCP) sees a request.

With `EMBEDSTREAM_API_KEYS` unset there is no auth, and the CLI refuses to
bind a non-loopback address without `--insecure`. With keys set, every path
but the liveness and readiness probes needs `Authorization: Bearer <key>`
(or `X-API-Key`). The request's `scope["embedstream.owner"]` is a digest of
the key, never the key itself: jobs are recorded under it.
"""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_server.errors import error_response

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
OWNER = "embedstream.owner"


def owner_of(key: str) -> str:
    """A stable, non-reversible id for an API key."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class APIKeyMiddleware:
    """Rejects requests without a valid key with 401 (when keys are configured)."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...]) -> None:
        self.app = app
        self.api_keys = tuple(k.encode() for k in api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.api_keys or scope["path"] in OPEN_PATHS:
            scope.setdefault(OWNER, "")
            await self.app(scope, receive, send)
            return
        key = _presented_key(scope)
        if key is None or not any(hmac.compare_digest(key, k) for k in self.api_keys):
            message = ("missing API key: send 'Authorization: Bearer <key>'" if key is None
                       else "invalid API key")
            await error_response(401, "unauthorized", message)(scope, receive, send)
            return
        scope[OWNER] = owner_of(key.decode(errors="replace"))
        await self.app(scope, receive, send)


def _presented_key(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return bytes(value[7:].strip())
        if name == b"x-api-key":
            return bytes(value.strip())
    return None
