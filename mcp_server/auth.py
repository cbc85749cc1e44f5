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
- A session is worth what its owner's key is worth now: its caller is
  rebuilt from the configured keys on every request, never from the
  record. Remove a key and its sessions stop at once (401, the record
  deleted); demote an admin key and its sessions lose admin at once.
- `settings.metrics_token` is not a key: it passes this middleware on
  `/metrics` only, owning nothing. `/metrics` itself answers admins (and
  the token); any other key gets 403, since cache hit and miss counts
  would tell one tenant what another embeds.
- The cookie's name depends on the scheme (see `mcp_server.sessions`):
  only `__Host-embedstream_session` is read over https, only
  `embedstream_session` over http, so a cookie planted over plain http
  cannot stand in for the secure one.
"""

from __future__ import annotations

import hmac
from dataclasses import replace

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_server.http_errors import error_response
from mcp_server.sessions import Session, SessionStore, cookie_name, is_https, proxy_networks
from pipeline import Settings
from pipeline.jobs import TRUSTED, Caller, owner_id

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
OPEN_ROUTES = frozenset({("POST", "/v1/session")})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CALLER = "embedstream.caller"
SESSION = "embedstream.session"
# Set on a /metrics request that presented the metrics token (not a key: it owns nothing).
SCRAPER = "embedstream.scraper"
METRICS_PATH = "/metrics"
CSRF_HEADER = "x-csrf-token"
# No key, no cookie: the caller of an open path when keys are on; it owns nothing.
NOBODY = Caller("-")


class KeyRing:
    """The configured keys: which are valid, which are admin, and the metrics token."""

    def __init__(self, settings: Settings) -> None:
        self.admin = tuple(k.encode() for k in settings.admin_keys)
        self.keys = tuple(k.encode() for k in settings.api_keys) + self.admin
        # Owner id -> admin, as configured now: what a session's owner is worth today.
        self.owners = {owner_id(k): False for k in settings.api_keys}
        self.owners |= {owner_id(k): True for k in settings.admin_keys}
        self.metrics_token = settings.metrics_token.encode()

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

    def owner(self, owner: str) -> Caller | None:
        """The caller an owner id stands for now, or None once no configured key has it."""
        admin = self.owners.get(owner)
        return None if admin is None else Caller(owner, admin=admin)

    def scrapes(self, key: bytes) -> bool:
        """Whether a presented key is the metrics token (which reads /metrics only)."""
        return bool(self.metrics_token) and hmac.compare_digest(key, self.metrics_token)


def caller_of(scope: Scope | None) -> Caller:
    """The caller the middleware put on a request; stdio (no request) is trusted."""
    if scope is None:
        return TRUSTED
    caller = scope.get(CALLER)
    return caller if isinstance(caller, Caller) else NOBODY


def may_scrape(scope: Scope) -> bool:
    """Whether a request may read /metrics: an admin (or no auth), or the metrics token."""
    return caller_of(scope).admin or scope.get(SCRAPER) is True


class APIKeyMiddleware:
    """Rejects requests without a valid key or session with 401 (when keys are configured)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.ring = KeyRing(settings)
        self.proxies = settings.trusted_proxies
        proxy_networks(self.proxies)  # a wrong entry fails at startup, not on a request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.ring.enabled:
            scope[CALLER] = TRUSTED
            await self.app(scope, receive, send)
            return
        refusal = await self._identify(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _identify(self, scope: Scope) -> Response | None:
        """Put the caller (and session) on the scope, or say why not."""
        headers = Headers(scope=scope)
        key = _presented_key(headers)
        if key is not None:
            caller = self.ring.caller(key)
            if caller is None and scope["path"] == METRICS_PATH and self.ring.scrapes(key):
                caller, scope[SCRAPER] = NOBODY, True
            if caller is None:
                return error_response(401, "unauthorized", "invalid API key")
            scope[CALLER] = caller
            return None
        session = await self._session(scope, headers)
        if session is not None and scope["method"] not in SAFE_METHODS and not _csrf_ok(
                session, headers):
            return error_response(403, "csrf_failed", "a request signed in by the session "
                                  "cookie must send the X-CSRF-Token header of GET /v1/session")
        if session is None and not _open(scope):
            return error_response(401, "unauthorized",
                                  "missing API key: send 'Authorization: Bearer <key>'")
        scope[CALLER] = session.caller if session is not None else NOBODY
        scope[SESSION] = session
        return None

    async def _session(self, scope: Scope, headers: Headers) -> Session | None:
        """The cookie's session, its caller as the keys configured now say (None if gone)."""
        session_id = _cookie(headers, cookie_name(is_https(scope, self.proxies)))
        if not session_id:
            return None
        store: SessionStore = scope["app"].state.sessions
        session = await store.get(session_id)
        if session is None:
            return None
        caller = self.ring.owner(session.caller.owner)
        if caller is None:  # its key was removed: the session ends with it
            await store.end(session)
            return None
        return replace(session, caller=caller)


def _open(scope: Scope) -> bool:
    path = scope["path"]
    return path in OPEN_PATHS or (scope["method"], path) in OPEN_ROUTES


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
