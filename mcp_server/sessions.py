"""Dashboard sessions: an API key exchanged for a cookie, on the sign-in page.

A session is a random id (the cookie's value, 256 bits) whose record lives
in Redis under `keys.session(id)` with a TTL, so any server replica accepts
it and signing out ends it everywhere. The record holds the caller (owner
id, admin flag, never the key) and the session's CSRF token. Only a digest
of the id names the Redis key, so reading Redis does not yield cookies.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from pipeline.jobs import Caller

if TYPE_CHECKING:
    from pipeline import Keys
    from pipeline.store import RedisClient

SESSION_COOKIE = "embedstream_session"


@dataclass(frozen=True)
class Session:
    """A signed-in dashboard: its id, caller and CSRF token."""

    id: str
    caller: Caller
    csrf_token: str


class SessionStore:
    """Creates, reads and ends sessions in Redis."""

    def __init__(self, redis: RedisClient, keys: Keys, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_s = ttl_s

    async def create(self, caller: Caller) -> Session:
        """A new session for `caller`."""
        session = Session(secrets.token_urlsafe(32), caller, secrets.token_urlsafe(32))
        record = {"owner": caller.owner, "admin": caller.admin, "csrf": session.csrf_token}
        await self.redis.set(self.keys.session(session.id), orjson.dumps(record), ex=self.ttl_s)
        return session

    async def get(self, session_id: str) -> Session | None:
        """The live session with this id, or None."""
        if len(session_id) > 128:
            return None
        raw = await self.redis.get(self.keys.session(session_id))
        if raw is None:
            return None
        record = orjson.loads(raw)
        caller = Caller(str(record["owner"]), admin=bool(record["admin"]))
        return Session(session_id, caller, str(record["csrf"]))

    async def end(self, session_id: str) -> None:
        """Sign out: the id is worthless from now on, on every replica."""
        await self.redis.delete(self.keys.session(session_id))
