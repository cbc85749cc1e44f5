"""Host and Origin checks on every route (DNS-rebinding and cross-site protection).

A browser page on an attacker's domain can make its name resolve to
127.0.0.1 and then talk to a local MCP server; the Host header (the
attacker's name) and the Origin header give it away. Without API keys the
server trusts loopback, so without this check such a page could read
`/v1/events` and any job's results. It runs before every route (REST, SSE,
dashboard, MCP), configured from `Settings`:

- Host: loopback names (any port) are always allowed, plus each entry of
  `settings.allowed_hosts` (`name` matches any port, `name:port` only that
  port). `"*"` turns the Host check off (say, behind a proxy that checks it).
- Origin: a request without one (every non-browser client) passes. Otherwise
  it must be a loopback origin, an entry of `settings.allowed_origins` or
  `settings.cors_origins` (`"*"` allows any), or `http(s)://` plus a
  configured allowed host: a page served from the server's own name is
  same-origin.

The probes (`/healthz`, `/readyz`) are exempt from the Host check, so that a
load balancer or orchestrator may probe the server by its IP or pod name.
The MCP SDK's own check is switched off on its transports, so there is one
policy, and one place to change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_server.http_errors import error_response
from pipeline import Settings

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
PROBES = frozenset({"/healthz", "/readyz"})


@dataclass(frozen=True)
class HostPolicy:
    """Which Host and Origin headers the server accepts."""

    hosts: frozenset[str]
    origins: frozenset[str]
    any_host: bool = False
    any_origin: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> HostPolicy:
        """Loopback plus `settings.allowed_hosts` / `settings.allowed_origins`."""
        hosts = {h.strip().lower() for h in settings.allowed_hosts if h.strip() not in ("", "*")}
        listed = (*settings.allowed_origins, *settings.cors_origins)
        origins = {o.strip().lower().rstrip("/") for o in listed if o.strip() not in ("", "*")}
        origins |= {f"{scheme}://{host}" for host in hosts for scheme in ("http", "https")}
        return cls(frozenset(hosts), frozenset(origins), "*" in settings.allowed_hosts,
                   "*" in settings.allowed_origins or "*" in settings.cors_origins)

    def host_allowed(self, host: str | None) -> bool:
        """Whether a Host header value (`name` or `name:port`) is allowed."""
        if self.any_host:
            return True
        if not host:
            return False
        host = host.lower()
        name = _host_name(host)
        return name in LOOPBACK_HOSTS or host in self.hosts or name in self.hosts

    def origin_allowed(self, origin: str | None) -> bool:
        """Whether an Origin header value is allowed (no Origin is allowed)."""
        if origin is None or self.any_origin:
            return True
        origin = origin.lower().rstrip("/")
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        if parts.hostname in LOOPBACK_HOSTS or origin in self.origins:
            return True
        return f"{parts.scheme}://{parts.hostname}" in self.origins


class HostGuard:
    """ASGI middleware answering 421 for a Host and 403 for an Origin the policy refuses."""

    def __init__(self, app: ASGIApp, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in PROBES:
            headers = Headers(scope=scope)
            host, origin = headers.get("host"), headers.get("origin")
            if not self.policy.host_allowed(host):
                reply = error_response(
                    421, "invalid_host",
                    f"Host {host!r} is not allowed; add it to EMBEDSTREAM_ALLOWED_HOSTS")
                await reply(scope, receive, send)
                return
            if not self.policy.origin_allowed(origin):
                reply = error_response(
                    403, "invalid_origin",
                    f"Origin {origin!r} is not allowed; add it to "
                    "EMBEDSTREAM_ALLOWED_ORIGINS")
                await reply(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _host_name(host: str) -> str:
    """The name part of a Host header: `[::1]:8000` -> `::1`, `a.b:80` -> `a.b`."""
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    name, _, port = host.rpartition(":")
    return name if name and port.isdigit() else host
