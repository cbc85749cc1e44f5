"""The Idempotency-Key protocol, whole: take, lease, bind, release, replay.

A key names the first request's job. A retry of the same request (same
options and inputs, compared by digest) gets that job; another request
under the same key is refused (`IdempotencyKeyReused`, 422) rather than
silently answered with a job that is not its own. The steps:

- take: a free key is leased to the upload (`Hold.TAKEN`); a key another
  upload holds a live lease on is a 409; a key bound to a visible job is a
  replay; a lapsed lease whose job never became visible is taken afresh;
- lease: the upload renews its lease while it runs (`leased`); one that
  stalled past its lease while a retry took the key over has lost it
  (`Lease`), and stops with a `Conflict` at its next input or, at the
  latest, when the lease is confirmed just before its job becomes visible;
- bind: once the job is queued, the lease becomes "<job id> <digest>";
- release: a submission that failed before its job became visible frees the key;
- replay: the job a reused key names, once the request is known to be the same.

The lease is a deadline inside the value (read against the server's clock),
not the key's TTL, so a lapsed lease still names its job: a retry after the
uploader died between making the job visible and binding the key finds that
job instead of making a second one. Keys are scoped by owner, so tenants
never share one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson
from redis.exceptions import RedisError

from pipeline.errors import Conflict, IdempotencyKeyReused, InvalidInput, JobNotFound
from pipeline.jobs.record import JobRecord, load_job
from pipeline.jobs.tenants import Caller, check_visible
from pipeline.store.connections import text_of
from pipeline.tasks import cancel_and_wait

if TYPE_CHECKING:
    from pipeline.inputs import Item, JobOptions
    from pipeline.keys import Keys
    from pipeline.settings import Settings
    from pipeline.store.connections import RedisClient

logger = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 255
IDEMPOTENCY_TTL_S = 24 * 3600
MAX_KEY_TRIES = 5
Items = Iterable["Item"] | AsyncIterable["Item"] | None


def check_idempotency_key(key: str | None, name: str = "Idempotency-Key") -> str | None:
    """A key must be 1 to `MAX_IDEMPOTENCY_KEY` characters (None: no key)."""
    if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidInput(f"{name} must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    return key


class RequestDigest:
    """A digest of a submission (options and every input), stored with its Idempotency-Key
    so a reuse of the key for a different request is told apart from a retry."""

    def __init__(self, options: JobOptions | None) -> None:
        self._hash = hashlib.sha256(orjson.dumps(repr(options)))

    def update(self, item: Item) -> None:
        """Add one input."""
        self._hash.update(orjson.dumps([item.text, item.id, item.metadata],
                                       option=orjson.OPT_SORT_KEYS) + b"\n")

    async def update_all(self, items: Items) -> None:
        """Add every input of `items`."""
        if isinstance(items, AsyncIterable):
            async for item in items:
                self.update(item)
        else:
            for item in items or ():
                self.update(item)

    def hexdigest(self) -> str:
        """The first 128 bits, in hex."""
        return self._hash.hexdigest()[:32]


class Hold(enum.Enum):
    """What an Idempotency-Key says when a submission tries to take it."""

    TAKEN = "taken"  # free: now leased to this submission
    BOUND = "bound"  # names a queued job ("<job id> <request digest>"): answer with it
    HELD = "held"  # another upload holds a live lease on it: 409
    LAPSED = "lapsed"  # an upload's lease ran out: its job may or may not be visible


@dataclass(frozen=True)
class KeyState:
    """An Idempotency-Key's state, the job it names, and its raw value (for a swap)."""

    hold: Hold
    job_id: str | None = None
    raw: bytes | None = None


# KEYS: idem.  ARGV: job id, lease ms, ttl s.  A value "<job>:<until ms>" is a lease.
_CLAIM_KEY = """
local value = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not value then
  redis.call('SET', KEYS[1], ARGV[1] .. ':' .. (now_ms + tonumber(ARGV[2])), 'EX', ARGV[3])
  return {'taken'}
end
local job, until_ms = string.match(value, '^(%x+):(%d+)$')
if not job then return {'bound', value, value} end
if tonumber(until_ms) > now_ms then return {'held', job, value} end
return {'lapsed', job, value}
"""

# KEYS: idem.  ARGV: expected value, job id, lease ms (0: bind to the job), ttl s.
_SWAP_KEY = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local value = ARGV[2]
if tonumber(ARGV[3]) > 0 then
  local t = redis.call('TIME')
  value = value .. ':' .. (tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ARGV[3])
end
redis.call('SET', KEYS[1], value, 'EX', ARGV[4])
return 1
"""

# KEYS: idem.  ARGV: job id, lease ms (0: bind), ttl s, bound value.  Only this job's lease.
_KEEP_KEY = """
local value = redis.call('GET', KEYS[1])
if not value or string.sub(value, 1, #ARGV[1] + 1) ~= ARGV[1] .. ':' then return 0 end
if tonumber(ARGV[2]) == 0 then
  redis.call('SET', KEYS[1], ARGV[4], 'EX', ARGV[3])
  return 1
end
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + ARGV[2]
redis.call('SET', KEYS[1], ARGV[1] .. ':' .. until_ms, 'KEEPTTL')
return 1
"""

# KEYS: idem.  ARGV: job id.  Frees the key if this job's upload still holds it.
_RELEASE_KEY = """
local value = redis.call('GET', KEYS[1])
if value and string.sub(value, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"""


class IdempotencyKeys:
    """Idempotency-Keys of one Redis: leased while an upload runs, bound to its job once queued."""

    def __init__(self, redis: RedisClient, keys: Keys, settings: Settings,
                 bound_ttl_s: int = IDEMPOTENCY_TTL_S) -> None:
        self.redis = redis
        self.keys = keys
        self.lease_s = settings.idempotency_lease_s
        self.lease_ms = int(settings.idempotency_lease_s * 1000)
        self.bound_ttl_s = bound_ttl_s
        self._claim = redis.register_script(_CLAIM_KEY)
        self._swap = redis.register_script(_SWAP_KEY)
        self._keep = redis.register_script(_KEEP_KEY)
        self._release = redis.register_script(_RELEASE_KEY)

    async def claim(self, scope: str, key: str, job_id: str) -> KeyState:
        """Lease the key to `job_id` if it is free; else say what holds it."""
        reply = await self._claim(keys=[self.keys.idempotency(scope, key)],
                                  args=[job_id, self.lease_ms, self.bound_ttl_s])
        hold = Hold(text_of(reply[0]))
        if len(reply) == 1:
            return KeyState(hold)
        return KeyState(hold, text_of(reply[1]), reply[2])

    async def swap(self, scope: str, key: str, expected: bytes, job_id: str,
                   *, lease: bool) -> bool:
        """Replace the value if unchanged: lease it to `job_id`, or bind it to that job."""
        reply = await self._swap(keys=[self.keys.idempotency(scope, key)],
                                 args=[expected, job_id, self.lease_ms if lease else 0,
                                       self.bound_ttl_s])
        return bool(reply)

    async def renew(self, scope: str, key: str, job_id: str) -> bool:
        """Push this upload's lease back; False if the lease was lost."""
        reply = await self._keep(keys=[self.keys.idempotency(scope, key)],
                                 args=[job_id, self.lease_ms, self.bound_ttl_s, ""])
        return bool(reply)

    async def bind(self, scope: str, key: str, job_id: str, digest: str) -> bool:
        """Turn this upload's lease into the binding to its (now queued) job and request."""
        reply = await self._keep(keys=[self.keys.idempotency(scope, key)],
                                 args=[job_id, 0, self.bound_ttl_s, f"{job_id} {digest}"])
        return bool(reply)

    async def release(self, scope: str, key: str, job_id: str) -> None:
        """Free the key of a submission that was rejected or died, so a retry can use it."""
        await self._release(keys=[self.keys.idempotency(scope, key)], args=[job_id])

    async def take(self, scope: str, key: str, job_id: str) -> IdempotencyClaim | None:
        """Lease `key` to the submission of `job_id` (None), or what the key already names.

        Raises Conflict while another upload holds a live lease on the key.
        """
        for _ in range(MAX_KEY_TRIES):
            state = await self.claim(scope, key, job_id)
            if state.hold is Hold.TAKEN:
                return None
            if state.hold is Hold.HELD:
                raise Conflict("a submission with this Idempotency-Key is being uploaded right "
                               "now; retry in a moment to get its job")
            assert state.job_id is not None and state.raw is not None
            named, _, digest = state.job_id.partition(" ")
            if await self._visible(named):
                if state.hold is Hold.BOUND or await self.swap(scope, key, state.raw,
                                                               named, lease=False):
                    return IdempotencyClaim(named, digest or None)
            elif await self.swap(scope, key, state.raw, job_id, lease=True):
                return None  # the job it named never became visible, or expired: start afresh
        raise Conflict("this Idempotency-Key kept changing hands; retry in a moment")

    async def _visible(self, job_id: str) -> bool:
        try:
            await load_job(self.redis, self.keys, job_id)
        except JobNotFound:
            return False
        return True

    @contextlib.asynccontextmanager
    async def leased(self, scope: str, key: str | None, job_id: str) -> AsyncIterator[Lease]:
        """Renew the upload's lease on its key while the block runs (no key: nothing)."""
        lease = Lease(self, scope, key, job_id)
        if not key:
            yield lease
            return

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.lease_s / 3)
                with contextlib.suppress(RedisError):
                    if not await self.renew(scope, key, job_id):
                        lease.lose()
                        return

        task = asyncio.create_task(renew())
        try:
            yield lease
        finally:
            await cancel_and_wait(task)

    async def holder(self, scope: str, key: str) -> str | None:
        """The job a key names (leased or bound), or None when it names none."""
        value = await self.redis.get(self.keys.idempotency(scope, key))
        if value is None:
            return None
        return re.split(r"[ :]", text_of(value), maxsplit=1)[0]

    async def replay(self, scope: str, key: str, claim: IdempotencyClaim,
                     digest: RequestDigest, items: Items) -> JobRecord:
        """The job a reused key names, once this request (fed to `digest`) is the same one."""
        if claim.digest is not None:
            await digest.update_all(items)
            if digest.hexdigest() != claim.digest:
                raise IdempotencyKeyReused(
                    f"Idempotency-Key {key[:80]!r} was first used for another request (other "
                    f"inputs or options; its job is {claim.job_id}); send a new key for a "
                    "new request")
        try:
            record = await load_job(self.redis, self.keys, claim.job_id)
            check_visible(claim.job_id, record.owner, Caller(scope))
        except JobNotFound:
            raise Conflict("a submission with this Idempotency-Key is still being written; "
                           "retry in a moment to get its job") from None
        return record


class Lease:
    """An upload's hold on its Idempotency-Key (none without a key): lost once another
    upload took the key while this one stalled, and from then on the upload must stop."""

    def __init__(self, keys: IdempotencyKeys, scope: str, key: str | None, job_id: str) -> None:
        self._keys = keys
        self.scope = scope
        self.key = key
        self.job_id = job_id
        self.lost = False

    def lose(self) -> None:
        """Record that another upload holds the key now."""
        if not self.lost:
            logger.warning("job %s lost its Idempotency-Key lease; its upload stops",
                           self.job_id)
        self.lost = True

    def check(self) -> None:
        """Raise Conflict once the lease is lost (a cheap check, made per input)."""
        if self.lost:
            raise Conflict(LEASE_LOST)

    async def confirm(self) -> None:
        """Renew the lease now, before the job is made visible; Conflict if it was lost."""
        if self.key and not self.lost and not await self._keys.renew(self.scope, self.key,
                                                                      self.job_id):
            self.lose()
        self.check()


LEASE_LOST = ("this upload stalled longer than its Idempotency-Key lease, and another request "
              "with the same key took it over; nothing was queued by this one: retry with the "
              "same key to get that request's job")


@dataclass(frozen=True)
class IdempotencyClaim:
    """The job an Idempotency-Key already names, and the digest of its request
    (None when its uploader died before binding it: nothing to compare with)."""

    job_id: str
    digest: str | None
