"""Signing in to the dashboard: `/v1/session` exchanges an API key for a session cookie.

    POST   /v1/session  {"key": "..."}  -> sets the cookie; {"owner", "admin", "csrf_token"}
    GET    /v1/session                  -> who is signed in, and the CSRF token to send
    DELETE /v1/session                  -> signs out (clears the cookie, ends the session)

The cookie is `HttpOnly` (page scripts cannot read it), `SameSite=Strict`
(no cross-site request carries it), `Path=/`, and over https (the request's
own, or a trusted proxy's `X-Forwarded-Proto`) `Secure` and named with the
`__Host-` prefix (`mcp_server.sessions`). The page learns its CSRF token
from `GET /v1/session` and sends it as `X-CSRF-Token` on every
state-changing request (the auth middleware checks it). Past the key's
session quota, signing in is 429 with Retry-After.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mcp_server.auth import CALLER, SESSION, KeyRing, caller_of
from mcp_server.http_errors import error_response
from mcp_server.payloads import json_body, settings_of
from mcp_server.responses import json_response
from mcp_server.sessions import Session, SessionsFull, SessionStore, cookie_name, is_https
from pipeline import InvalidInput, InvalidRequest, Unauthorized


def _store(request: Request) -> SessionStore:
    store: SessionStore = request.app.state.sessions
    return store


def _describe(session: Session | None, request: Request) -> dict[str, object]:
    caller = caller_of(request.scope)
    auth = KeyRing(settings_of(request)).enabled
    return {"auth": auth, "signed_in": session is not None or not auth,
            "owner": caller.owner, "admin": caller.admin,
            "csrf_token": session.csrf_token if session is not None else None}


async def sign_in(request: Request) -> Response:
    """POST /v1/session: a valid key in, the session cookie out."""
    settings = settings_of(request)
    ring = KeyRing(settings)
    if not ring.enabled:
        raise InvalidRequest("API keys are not configured here: there is nothing to sign in to")
    body = await json_body(request)
    key = body.get("key")
    if not isinstance(key, str) or not key:
        raise InvalidInput("'key' must be your API key, as a string")
    caller = ring.caller(key.encode())
    if caller is None:
        raise Unauthorized("invalid API key")
    session = await _store(request).create(caller, settings.key_quota_sessions)
    if isinstance(session, SessionsFull):
        return error_response(
            429, "overloaded", f"this key holds {session.quota} dashboard sessions, the most "
            "EMBEDSTREAM_KEY_QUOTA_SESSIONS allows: sign out of one, or retry after "
            f"{session.retry_after_s} s", headers={"Retry-After": str(session.retry_after_s)})
    request.scope[CALLER] = caller
    response = json_response(_describe(session, request))
    https = is_https(request.scope, settings.trusted_proxies)
    response.set_cookie(cookie_name(https), session.id, max_age=_store(request).ttl_s, path="/",
                        secure=https, httponly=True, samesite="strict")
    return response


async def current(request: Request) -> Response:
    """GET /v1/session: the signed-in caller and its CSRF token."""
    return json_response(_describe(request.scope.get(SESSION), request))


async def sign_out(request: Request) -> Response:
    """DELETE /v1/session: end the session and clear the cookie."""
    session: Session | None = request.scope.get(SESSION)
    if session is not None:
        await _store(request).end(session)
    response = json_response({"signed_in": False})
    https = is_https(request.scope, settings_of(request).trusted_proxies)
    response.delete_cookie(cookie_name(https), path="/", secure=https, httponly=True,
                           samesite="strict")
    return response


routes = [
    Route("/v1/session", sign_in, methods=["POST"]),
    Route("/v1/session", current, methods=["GET"]),
    Route("/v1/session", sign_out, methods=["DELETE"]),
]
