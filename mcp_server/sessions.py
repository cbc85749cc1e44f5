"""Dashboard sessions: an API key exchanged for a cookie, on the sign-in page.

A session is a random id (the cookie's value, 256 bits) whose record lives
in Redis under `keys.session(id)` with a TTL, so any server replica accepts
it and signing out ends it everywhere. The record holds the owner id (never
the key) and the session's CSRF token. Only a digest of the id names the
Redis key, so reading Redis does not yield cookies. Whether the owner is
still a configured key, and whether it is an admin, is decided by the auth
middleware against the configuration of now, never by the record.

Each owner has an index, `keys.sessions(owner)`: a sorted set of its
session keys scored by expiry (ms, Redis clock), pruned as it is written,
expiring with its last session. The index is what makes a session valid: a
record counts only while its key is in its owner's index. The index and the
record live in different cluster slots, so no script may touch both; the
order of the steps makes every interleaving safe instead:

- Signing in writes the record first, then one script on the index prunes
  expired entries and adds the session unless the owner is at its quota.
  A process that dies between the two leaves a record nobody holds a
  cookie for and no index names: worthless, gone at its TTL. A refused
  sign-in deletes its record (worthless too, should that fail).
- Ending a session (signing out, or its key gone) removes it from the index
  first, which ends it on every replica at once, then deletes the record.
  Dying in between leaves the same worthless record.

So a quota slot is never held by a session that cannot be used, and no
usable session is missing from the count.

Past the quota (`EMBEDSTREAM_KEY_QUOTA_SESSIONS`), signing in is refused
(429 with Retry-After, when the oldest session expires), rather than
evicting the oldest session, on purpose: the sessions of one key are often
several people's or several browsers' (a team key), and a script or a
careless loop that signs in again and again must not sign everyone else
out without a word. A refusal names the limit, leaves working dashboards
working, and costs Redis nothing past the quota.

Cookies: `__Host-embedstream_session` over https (the prefix makes the
browser insist on Secure, Path=/ and no Domain, so no sibling host or plain
http page can plant one), `embedstream_session` over plain http. A request
is https when its own scheme is, or when a peer listed in
`settings.trusted_proxies` says so with `X-Forwarded-Proto`; nobody else is
believed. Browsers share cookies across the ports of one host, so two
servers on `localhost` share one cookie jar: signing in to one replaces the
other's cookie.
"""

from __future__ import annotations

import functools
import ipaddress
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from starlette.datastructures import Headers
from starlette.types import Scope

from pipeline.jobs import Caller

if TYPE_CHECKING:
    from pipeline import Keys
    from pipeline.store import RedisClient

SESSION_COOKIE = "embedstream_session"
SECURE_SESSION_COOKIE = "__Host-embedstream_session"

# KEYS: the owner's index. ARGV: session key, TTL (ms), quota (0: none).
# Returns {1, 0} when added, {0, ms until the oldest session expires} when full.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local quota = tonumber(ARGV[3])
if quota > 0 and redis.call('ZCARD', KEYS[1]) >= quota then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, math.floor(tonumber(oldest[2])) - now}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], math.floor(tonumber(last[2])))
return {1, 0}
"""


@dataclass(frozen=True)
class Session:
    """A signed-in dashboard: its id, caller and CSRF token."""

    id: str
    caller: Caller
    csrf_token: str


@dataclass(frozen=True)
class SessionsFull:
    """A sign-in refused: the owner holds its quota of sessions."""

    quota: int
    retry_after_s: int


class SessionStore:
    """Creates, reads and ends sessions in Redis."""

    def __init__(self, redis: RedisClient, keys: Keys, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s
        self._admit = redis.register_script(_ADMIT)

    async def create(self, caller: Caller, quota: int = 0) -> Session | SessionsFull:
        """A new session for `caller`, unless it already holds `quota` of them (0: no limit)."""
        session = Session(secrets.token_urlsafe(32), caller, secrets.token_urlsafe(32))
        key = self.keys.session(session.id)
        record = {"owner": caller.owner, "csrf": session.csrf_token}
        await self.redis.set(key, orjson.dumps(record), ex=self.ttl_s)
        added, wait_ms = await self._admit(keys=[self.keys.sessions(caller.owner)],
                                           args=[key, self.ttl_s * 1000, quota])
        if int(added):
            return session
        await self.redis.delete(key)
        return SessionsFull(quota, max(1, -(-int(wait_ms) // 1000)))

    async def get(self, session_id: str) -> Session | None:
        """The live session with this id (its caller as recorded), or None."""
        if len(session_id) > 128:
            return None
        key = self.keys.session(session_id)
        raw = await self.redis.get(key)
        if raw is None:
            return None
        record = orjson.loads(raw)
        owner = str(record["owner"])
        if await self.redis.zscore(self.keys.sessions(owner), key) is None:
            return None
        return Session(session_id, Caller(owner), str(record["csrf"]))

    async def end(self, session: Session) -> None:
        """Sign out: the id is worthless from now on, on every replica."""
        key = self.keys.session(session.id)
        await self.redis.zrem(self.keys.sessions(session.caller.owner), key)
        await self.redis.delete(key)


def cookie_name(https: bool) -> str:
    """The session cookie's name: `__Host-` prefixed over https."""
    return SECURE_SESSION_COOKIE if https else SESSION_COOKIE


def is_https(scope: Scope, trusted_proxies: tuple[str, ...]) -> bool:
    """Whether a request came over https: its own scheme, or a trusted proxy's word for it."""
    if scope.get("scheme") in ("https", "wss"):
        return True
    # The last value is the one the nearest proxy added; a client may have sent the others.
    forwarded = Headers(scope=scope).get("x-forwarded-proto", "").rpartition(",")[2]
    if forwarded.strip().lower() != "https" or not trusted_proxies:
        return False
    client = scope.get("client")
    return client is not None and _trusted(str(client[0]), trusted_proxies)


def _trusted(address: str, trusted_proxies: tuple[str, ...]) -> bool:
    if "*" in trusted_proxies:
        return True
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped
    return any(peer in network for network in proxy_networks(trusted_proxies))


@functools.lru_cache(maxsize=16)
def proxy_networks(
    trusted_proxies: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The trusted proxies as networks ("*" aside); a wrong entry is a ValueError naming it."""
    networks = []
    for entry in trusted_proxies:
        if entry.strip() in ("", "*"):
            continue
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"EMBEDSTREAM_TRUSTED_PROXIES: {entry!r} is neither an address "
                             "nor a CIDR") from None
    return tuple(networks)
