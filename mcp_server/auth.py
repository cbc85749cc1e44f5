"""Who is calling: bearer API keys, and the dashboard's session cookie, before any route.

With neither `EMBEDSTREAM_API_KEYS` nor `EMBEDSTREAM_ADMIN_KEYS` set there is
no auth: every request is the trusted caller (the CLI refuses a non-loopback
bind without `--insecure`, and `HostGuard` keeps rebinding pages out). With
keys set, every path but the open ones needs `Authorization: Bearer <key>`
(or `X-API-Key`), or the session cookie the sign-in page exchanged a key
for. The request's `scope["embedstream.caller"]` is a `Caller`: the key's
owner id (a digest, never the key) and whether it is an admin key.

Deliberate choices, so nobody "fixes" them:

- The cookie authenticates reads (the dashboard's GETs and its
  `EventSource`, which cannot send headers), but a state-changing request
  authenticated by the cookie alone must also carry `X-CSRF-Token` with the
  session's token, or it is 403. `SameSite=Strict` and the Origin check
  already stop cross-site requests; the token is the second lock.
- `GET /` is open so that it can show the sign-in form; it shows the
  dashboard only to a signed-in caller. `POST /v1/session` (signing in) is
  open because it takes the key in its body.
"""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_server.http_errors import error_response
from mcp_server.sessions import SESSION_COOKIE, Session, SessionStore
from pipeline import Settings
from pipeline.jobs import TRUSTED, Caller, owner_id

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
OPEN_ROUTES = frozenset({("POST", "/v1/session")})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CALLER = "embedstream.caller"
SESSION = "embedstream.session"
CSRF_HEADER = "x-csrf-token"
# No key, no cookie: the caller of an open path when keys are on; it owns nothing.
NOBODY = Caller("-")


class KeyRing:
    """The configured keys: which are valid, which are admin."""

    def __init__(self, settings: Settings) -> None:
        self.admin = tuple(k.encode() for k in settings.admin_keys)
        self.keys = tuple(k.encode() for k in settings.api_keys) + self.admin

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (else there is no auth)."""
        return bool(self.keys)

    def caller(self, key: bytes) -> Caller | None:
        """The caller a presented key stands for, or None for a wrong key."""
        if not any(hmac.compare_digest(key, k) for k in self.keys):
            return None
        admin = any(hmac.compare_digest(key, k) for k in self.admin)
        return Caller(owner_id(key.decode(errors="replace")), admin=admin)


def caller_of(scope: Scope | None) -> Caller:
    """The caller the middleware put on a request; stdio (no request) is trusted."""
    if scope is None:
        return TRUSTED
    caller = scope.get(CALLER)
    return caller if isinstance(caller, Caller) else NOBODY


class APIKeyMiddleware:
    """Rejects requests without a valid key or session with 401 (when keys are configured)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.ring = KeyRing(settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.ring.enabled:
            scope[CALLER] = TRUSTED
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        key = _presented_key(headers)
        if key is not None:
            caller = self.ring.caller(key)
            if caller is None:
                await error_response(401, "unauthorized", "invalid API key")(scope, receive, send)
                return
            scope[CALLER] = caller
            await self.app(scope, receive, send)
            return
        session = await _session(scope, headers)
        if session is not None and scope["method"] not in SAFE_METHODS and not _csrf_ok(
                session, headers):
            reply = error_response(403, "csrf_failed", "a request signed in by the session "
                                   "cookie must send the X-CSRF-Token header of GET /v1/session")
            await reply(scope, receive, send)
            return
        if session is None and not _open(scope):
            reply = error_response(401, "unauthorized",
                                   "missing API key: send 'Authorization: Bearer <key>'")
            await reply(scope, receive, send)
            return
        scope[CALLER] = session.caller if session is not None else NOBODY
        scope[SESSION] = session
        await self.app(scope, receive, send)


def _open(scope: Scope) -> bool:
    path = scope["path"]
    return path in OPEN_PATHS or (scope["method"], path) in OPEN_ROUTES


async def _session(scope: Scope, headers: Headers) -> Session | None:
    session_id = _cookie(headers, SESSION_COOKIE)
    if not session_id:
        return None
    store: SessionStore = scope["app"].state.sessions
    return await store.get(session_id)


def _csrf_ok(session: Session, headers: Headers) -> bool:
    token = headers.get(CSRF_HEADER, "")
    return bool(token) and hmac.compare_digest(token.encode(), session.csrf_token.encode())


def _presented_key(headers: Headers) -> bytes | None:
    for name, value in headers.raw:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return bytes(value[7:].strip())
        if name == b"x-api-key":
            return bytes(value.strip())
    return None


def _cookie(headers: Headers, name: str) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value
    return None
