"""The atomic operations on one model's queue lanes: trim, forget, release, resume,
claim.

Each is one Lua script over the lanes of one hash slot (`{q:<model>}:fast`
and bulk partition 0 share one, each further bulk partition has its own;
see `pipeline.keys.QueueLayout`), so this also holds on Redis Cluster,
registered once and returning a typed outcome. They are scripts because each decides
from the pending-entry list and then acts on it: done in two round trips, a
peer's XREADGROUP in between changes what the decision was based on.

- Trim: XTRIM MINID to the oldest entry still pending, or, with none pending,
  to the group's last-delivered id (what follows it is not delivered yet).
  Read apart from the trim, a peer's read between XPENDING and XINFO moved
  the floor past its own unacked entries, which were then deleted.
- Forget: XGROUP DELCONSUMER only when the consumer holds no pending entry
  at that instant; DELCONSUMER drops a consumer's pending entries, and a
  worker wrongly taken for dead may have read some since it was checked.
  Forgetting a live consumer that holds nothing is harmless: its next read
  or claim makes it again.
- Release: a draining worker hands back entries it claimed but never
  started. XCLAIM to itself with IDLE past the visibility timeout makes them
  reclaimable by any peer at once, and RETRYCOUNT one less undoes the
  delivery that never was an attempt, so a rolling restart does not push
  healthy chunks towards the poison limit.
- Resume: a live worker whose round failed on a lost Redis takes up the
  entries it still holds (claimed, read ahead, or in a commit that failed)
  as soon as Redis answers again. XCLAIM JUSTID re-leases them without
  counting a delivery: an outage is not an attempt, and the chunks go on
  at once instead of after the visibility timeout. One script, so a peer
  cannot reclaim an entry between the read of the pending list and the
  re-lease (XCLAIM would take it back). An entry whose message is gone is
  acked.
- Claim: fast-lane entries one at a time up to a budget of texts, in one
  round trip. An entry carries up to `fast_lane_max_texts` texts, so reading
  a budget's count of entries at once could take far more texts than one
  model call holds and leave peers idle; reading one by one from the
  worker took a round trip per entry.

Inside Lua, replies come in RESP2 shapes on Redis 7.0 and Valkey 9 alike:
the XPENDING summary is `{count, min|false, max|false, consumers|false}`,
XINFO GROUPS a list of flat name/value lists, a missing stream or group an
error table (`redis.pcall`) that becomes the `no-group` outcome.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline import GROUP

if TYPE_CHECKING:
    from collections.abc import Iterable

    from pipeline.store import RedisClient

NO_GROUP = -1

# KEYS: the lanes. ARGV: group. Returns, per lane, entries deleted or -1 (no group).
_TRIM = """
local out = {}
for i, lane in ipairs(KEYS) do
  local summary = redis.pcall('XPENDING', lane, ARGV[1])
  if type(summary) == 'table' and summary.err then
    out[i] = -1
  else
    local floor = summary[2]
    if not floor then
      for _, group in ipairs(redis.call('XINFO', 'GROUPS', lane)) do
        local fields = {}
        for j = 1, #group, 2 do fields[group[j]] = group[j + 1] end
        if fields['name'] == ARGV[1] then floor = fields['last-delivered-id'] end
      end
      if floor == '0-0' then floor = false end
    end
    out[i] = floor and redis.call('XTRIM', lane, 'MINID', floor) or 0
  end
end
return out
"""

# KEYS: the lanes. ARGV: group, consumer.
# Returns, per lane: 1 forgotten, 0 kept (it holds pending entries), -1 no group.
_FORGET = """
local out = {}
for i, lane in ipairs(KEYS) do
  local held = redis.pcall('XPENDING', lane, ARGV[1], '-', '+', 1, ARGV[2])
  if type(held) == 'table' and held.err then
    out[i] = -1
  elseif #held > 0 then
    out[i] = 0
  else
    redis.call('XGROUP', 'DELCONSUMER', lane, ARGV[1], ARGV[2])
    out[i] = 1
  end
end
return out
"""

# KEYS: the lanes. ARGV: group, consumer, idle_ms, then lane number and entry id pairs.
# Returns the number of entries released (those the consumer still held).
_RELEASE = """
local released = 0
for i = 4, #ARGV, 2 do
  local lane = KEYS[tonumber(ARGV[i])]
  local row = redis.pcall('XPENDING', lane, ARGV[1], ARGV[i + 1], ARGV[i + 1], 1)
  if type(row) == 'table' and not row.err and row[1] and row[1][2] == ARGV[2] then
    local count = math.max(tonumber(row[1][4]) - 1, 0)
    redis.call('XCLAIM', lane, ARGV[1], ARGV[2], 0, ARGV[i + 1],
               'IDLE', ARGV[3], 'RETRYCOUNT', count, 'JUSTID')
    released = released + 1
  end
end
return released
"""

# KEYS: the lanes. ARGV: group, consumer, most entries per lane.
# Returns, per lane, `{id, {field, value, ...}, deliveries}` for each entry the consumer
# holds, each re-leased now with its delivery count unchanged; an entry whose message
# is gone is acked instead.
_RESUME = """
local out = {}
for i, lane in ipairs(KEYS) do
  local got = {}
  local rows = redis.pcall('XPENDING', lane, ARGV[1], '-', '+', tonumber(ARGV[3]), ARGV[2])
  if type(rows) == 'table' and not rows.err then
    for _, row in ipairs(rows) do
      local entry = redis.call('XRANGE', lane, row[1], row[1])[1]
      if entry then
        redis.call('XCLAIM', lane, ARGV[1], ARGV[2], 0, row[1], 'JUSTID')
        got[#got + 1] = {row[1], entry[2], row[4]}
      else
        redis.call('XACK', lane, ARGV[1], row[1])
      end
    end
  end
  out[i] = got
end
return out
"""

# KEYS: one lane. ARGV: group, consumer, budget of texts.
# Returns the new entries read (XREADGROUP's `{id, {field, value, ...}}`), one at a
# time until their `n` fields reach the budget or the lane has no more.
_CLAIM = """
local got, texts = {}, 0
while texts < tonumber(ARGV[3]) do
  local reply = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1,
                           'STREAMS', KEYS[1], '>')
  if not reply then break end
  local entry = reply[1][2][1]
  got[#got + 1] = entry
  local fields, n = entry[2], 1
  for i = 1, #fields, 2 do
    if fields[i] == 'n' then n = tonumber(fields[i + 1]) or 1 end
  end
  texts = texts + n
end
return got
"""


class Forgotten(enum.Enum):
    """What forgetting a consumer did on one lane."""

    FORGOTTEN = 1
    KEPT = 0  # it holds pending entries: they must be reclaimed first
    NO_GROUP = -1


@dataclass(frozen=True)
class Trimmed:
    """What trimming did on one lane: entries deleted, or no group there."""

    lane: str
    deleted: int
    no_group: bool = False


@dataclass(frozen=True)
class Held:
    """An entry a consumer holds, as `Lanes.resume` re-leased it."""

    lane: str
    entry_id: bytes
    fields: dict[bytes, bytes]
    deliveries: int


class Lanes:
    """One model's queue lanes and the scripts that keep them, registered once.

    A script touches one hash slot: the lanes come in `groups` of one slot each
    (the fast lane with bulk partition 0, then each further bulk partition),
    and each script runs once per group.
    """

    def __init__(self, redis: RedisClient, groups: tuple[tuple[str, ...], ...]) -> None:
        self.redis = redis
        self.groups = groups
        self._trim = redis.register_script(_TRIM)
        self._forget = redis.register_script(_FORGET)
        self._release = redis.register_script(_RELEASE)
        self._claim = redis.register_script(_CLAIM)
        self._resume = redis.register_script(_RESUME)

    async def trim(self) -> list[Trimmed]:
        """Drop acked entries: everything below the oldest pending or undelivered one."""
        trimmed = []
        for lanes in self.groups:
            replies = await self._trim(keys=list(lanes), args=[GROUP])
            trimmed += [Trimmed(lane, max(int(n), 0), int(n) == NO_GROUP)
                        for lane, n in zip(lanes, replies, strict=True)]
        return trimmed

    async def forget(self, consumer: str) -> dict[str, Forgotten]:
        """Delete `consumer` from each lane's group where it holds nothing pending."""
        outcome: dict[str, Forgotten] = {}
        for lanes in self.groups:
            replies = await self._forget(keys=list(lanes), args=[GROUP, consumer])
            outcome |= {lane: Forgotten(int(n)) for lane, n in zip(lanes, replies, strict=True)}
        return outcome

    async def release(self, consumer: str, entries: Iterable[tuple[str, bytes]],
                      idle_ms: int) -> int:
        """Make entries `consumer` holds reclaimable by peers now; returns how many."""
        held = list(entries)
        released = 0
        for lanes in self.groups:
            number = {lane: i + 1 for i, lane in enumerate(lanes)}
            args: list[Any] = [GROUP, consumer, idle_ms]
            for lane, entry_id in held:
                if lane in number:
                    args += [number[lane], entry_id]
            if len(args) > 3:
                released += int(await self._release(keys=list(lanes), args=args))
        return released

    async def resume(self, consumer: str, most: int = 1000) -> list[Held]:
        """The entries `consumer` holds, re-leased to it without counting a delivery."""
        held: list[Held] = []
        for lanes in self.groups:
            replies = await self._resume(keys=list(lanes), args=[GROUP, consumer, most])
            for lane, rows in zip(lanes, replies, strict=True):
                held += [Held(lane, entry_id, dict(zip(flat[::2], flat[1::2], strict=True)),
                              int(deliveries)) for entry_id, flat, deliveries in rows]
        return held

    async def claim(self, lane: str, consumer: str,
                    budget: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """New entries of `lane` for `consumer`, read one by one up to `budget` texts."""
        replies = await self._claim(keys=[lane], args=[GROUP, consumer, budget])
        return [(entry_id, dict(zip(flat[::2], flat[1::2], strict=True)))
                for entry_id, flat in replies or ()]
