"""The Redis commands embedstream sends, typed as the replies it actually gets.

redis-py types every reply as a union over its options (`bytes | str` for
`decode_responses`, `Awaitable[X] | X` for sync and async clients). The
clients from `connect()` pin one shape: asyncio, RESP2, bytes replies, and
redis-py's default ("legacy") response callbacks. `RedisClient` declares
exactly the commands this code base uses, with the arguments it passes and
the replies those settings produce, so `mypy --strict` checks every call.

Deliberate choices, so nobody "fixes" them:

- Replies follow redis-py's RESP2 callbacks (`redis/_parsers/helpers.py`,
  `response_callbacks.py`), not the server's wire types: SET answers True or
  None, EXPIRE and XGROUP CREATE a bool, PING a bool (on a cluster, all
  nodes'), HINCRBYFLOAT a float, XINFO dicts have str keys and bytes, int or
  nil values. `tests/pipeline/test_commands.py` pins these shapes on a server and
  on a cluster.
- XREAD/XREADGROUP answer a list of two-item *lists* (stream, entries) and
  XAUTOCLAIM a list of two (Redis 6.2) or three items; typing has no
  fixed-length list, so they are typed as the tuples they index and unpack
  like.
- `Any` only where a reply is truly heterogeneous: a Lua script's (nil, int,
  bytes or nested lists, as the script returns) and a pipeline's `execute()`
  (one reply per queued command, each of its own command's type).
- A command queued on a pipeline returns the pipeline; its reply comes from
  `execute()`.
- Only the options this code base passes are declared: a new option or
  command is added here first, checked against redis-py's parser.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, NotRequired, Protocol, Self, TypeAlias, TypedDict, overload

# What redis-py encodes as a key, a hash field, a stream id or a value.
Key: TypeAlias = str | bytes
StreamId: TypeAlias = str | bytes
Value: TypeAlias = bytes | str | int | float
ScoreBound: TypeAlias = float | str  # "-inf", "+inf", "(5": a str carries the bound's syntax

# (id, fields) of one stream entry; fields are {} for a deleted entry still pending.
StreamEntry: TypeAlias = tuple[bytes, dict[bytes, bytes]]
# (stream name, entries) of an XREAD/XREADGROUP reply (a two-item list at run time).
StreamRead: TypeAlias = tuple[bytes, list[StreamEntry]]
# An XAUTOCLAIM entry; (None, None) for an id whose entry was deleted (Redis 6.2).
ClaimedEntry: TypeAlias = tuple[bytes, dict[bytes, bytes]] | tuple[None, None]
# (next start id, claimed entries[, deleted ids on Redis 7+]), a list at run time.
AutoClaim: TypeAlias = (
    tuple[bytes, list[ClaimedEntry]] | tuple[bytes, list[ClaimedEntry], list[bytes]]
)
# An XINFO GROUPS row; entries-read and lag are Redis 7+, nil when the server cannot tell.
GroupInfo = TypedDict("GroupInfo", {
    "name": bytes, "consumers": int, "pending": int, "last-delivered-id": bytes,
    "entries-read": NotRequired[int | None], "lag": NotRequired[int | None],
})
# An XINFO CONSUMERS row: name (bytes), pending, idle and inactive (Redis 7.2+) counts.
ConsumerInfo: TypeAlias = dict[str, bytes | int]


class Script(Protocol):
    """A Lua script registered on a client, run by hash (on a pipeline with `client`)."""

    # Any: the reply is whatever the script returns (nil, int, bytes, nested lists).
    async def __call__(self, keys: Sequence[Key] | None = None,
                       args: Iterable[Value] | None = None,
                       client: RedisPipeline | None = None) -> Any:
        """Run the script (or queue it on `client`)."""
        ...


class RedisPipeline(Protocol):
    """A non-transactional pipeline: commands queue, `execute()` sends them."""

    async def __aenter__(self) -> Self:
        """The pipeline itself."""
        ...

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc_value: BaseException | None,
                        traceback: TracebackType | None) -> None:
        """Forget what was queued."""
        ...

    # Any: one reply per queued command, each of that command's reply type.
    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send the queued commands; their replies in order (errors as values if not raised)."""
        ...

    def get(self, name: Key) -> Self:
        """Queue GET (reply: bytes | None)."""
        ...

    def set(self, name: Key, value: Value, *, ex: int | None = None,
            px: int | None = None) -> Self:
        """Queue SET (reply: True)."""
        ...

    def delete(self, *names: Key) -> Self:
        """Queue DEL (reply: int)."""
        ...

    def exists(self, *names: Key) -> Self:
        """Queue EXISTS (reply: int)."""
        ...

    def expire(self, name: Key, time: int) -> Self:
        """Queue EXPIRE (reply: bool)."""
        ...

    def pttl(self, name: Key) -> Self:
        """Queue PTTL (reply: int)."""
        ...

    def incrby(self, name: Key, amount: int = 1) -> Self:
        """Queue INCRBY (reply: int)."""
        ...

    def hget(self, name: Key, key: Key) -> Self:
        """Queue HGET (reply: bytes | None)."""
        ...

    def hgetall(self, name: Key) -> Self:
        """Queue HGETALL (reply: dict[bytes, bytes])."""
        ...

    def hset(self, name: Key, key: Key, value: Value) -> Self:
        """Queue HSET of one field (reply: int)."""
        ...

    def hincrby(self, name: Key, key: Key, amount: int = 1) -> Self:
        """Queue HINCRBY (reply: int)."""
        ...

    def hincrbyfloat(self, name: Key, key: Key, amount: float = 1.0) -> Self:
        """Queue HINCRBYFLOAT (reply: float)."""
        ...

    def zadd(self, name: Key, mapping: Mapping[Key, float]) -> Self:
        """Queue ZADD (reply: int)."""
        ...

    def zremrangebyscore(self, name: Key, min: ScoreBound, max: ScoreBound) -> Self:
        """Queue ZREMRANGEBYSCORE (reply: int)."""
        ...

    def zcard(self, name: Key) -> Self:
        """Queue ZCARD (reply: int)."""
        ...

    def rpush(self, name: Key, *values: Value) -> Self:
        """Queue RPUSH (reply: int)."""
        ...

    def xadd(self, name: Key, fields: Mapping[Key, Value], *, maxlen: int | None = None,
             approximate: bool = True) -> Self:
        """Queue XADD (reply: the entry id, bytes)."""
        ...

    def xack(self, name: Key, groupname: str, *ids: StreamId) -> Self:
        """Queue XACK (reply: int)."""
        ...

    def xpending_range(self, name: Key, groupname: str, min: StreamId, max: StreamId,
                       count: int) -> Self:
        """Queue XPENDING's range form (reply: dicts of message_id, times_delivered...)."""
        ...


class RedisClient(Protocol):
    """An asyncio client from `connect()`: a server's or a cluster's, bytes replies."""

    async def aclose(self) -> None:
        """Close the client and its connections."""
        ...

    def pipeline(self, transaction: bool = True) -> RedisPipeline:
        """A pipeline (on a cluster, split per node and run in parallel)."""
        ...

    def register_script(self, script: str) -> Script:
        """A script to run by hash, loaded when missing."""
        ...

    async def ping(self) -> bool:
        """PING: True when answered."""
        ...

    async def info(self, section: str | None = None) -> dict[str, Any]:
        """INFO, parsed (values of `key=value,...` lists are dicts)."""
        ...

    async def get(self, name: Key) -> bytes | None:
        """GET."""
        ...

    async def set(self, name: Key, value: Value, *, ex: int | None = None,
                  px: int | None = None, nx: bool = False) -> bool | None:
        """SET: True when set, None when NX found the key."""
        ...

    async def delete(self, *names: Key) -> int:
        """DEL: how many keys were removed."""
        ...

    async def exists(self, *names: Key) -> int:
        """EXISTS: how many of the keys exist."""
        ...

    async def incrby(self, name: Key, amount: int = 1) -> int:
        """INCRBY: the new value."""
        ...

    async def hget(self, name: Key, key: Key) -> bytes | None:
        """HGET."""
        ...

    async def hgetall(self, name: Key) -> dict[bytes, bytes]:
        """HGETALL: empty when the key is missing."""
        ...

    async def hkeys(self, name: Key) -> list[bytes]:
        """HKEYS."""
        ...

    async def hmget(self, name: Key, keys: Sequence[Key]) -> list[bytes | None]:
        """HMGET: one value or None per field, in order."""
        ...

    async def hdel(self, name: Key, *keys: Key) -> int:
        """HDEL: how many fields were removed."""
        ...

    @overload
    async def zrange(self, name: Key, start: int | str, end: int | str, *,
                     desc: bool = False, withscores: Literal[False] = False,
                     byscore: bool = False, offset: int | None = None,
                     num: int | None = None) -> list[bytes]: ...

    @overload
    async def zrange(self, name: Key, start: int | str, end: int | str, *,
                     desc: bool = False, withscores: Literal[True],
                     byscore: bool = False, offset: int | None = None,
                     num: int | None = None) -> list[tuple[bytes, float]]: ...

    async def zrange(self, name: Key, start: int | str, end: int | str, *,
                     desc: bool = False, withscores: bool = False,
                     byscore: bool = False, offset: int | None = None,
                     num: int | None = None) -> list[bytes] | list[tuple[bytes, float]]:
        """ZRANGE: members, or (member, score) pairs `withscores`."""
        ...

    async def zadd(self, name: Key, mapping: Mapping[Key, float]) -> int:
        """ZADD: how many members were added."""
        ...

    async def zrem(self, name: Key, *values: Key) -> int:
        """ZREM: how many members were removed."""
        ...

    async def zscore(self, name: Key, value: Key) -> float | None:
        """ZSCORE: the member's score, or None when it is not in the set."""
        ...

    async def zpopmin(self, name: Key, count: int | None = None) -> list[tuple[bytes, float]]:
        """ZPOPMIN: (member, score) pairs, lowest first."""
        ...

    async def blpop(self, keys: Sequence[Key], timeout: int = 0) -> tuple[bytes, bytes] | None:
        """BLPOP: (list name, value), or None at the timeout."""
        ...

    async def xadd(self, name: Key, fields: Mapping[Key, Value], *, maxlen: int | None = None,
                   approximate: bool = True) -> bytes:
        """XADD: the new entry's id."""
        ...

    async def xlen(self, name: Key) -> int:
        """XLEN."""
        ...

    async def xtrim(self, name: Key, *, minid: StreamId, approximate: bool = True) -> int:
        """XTRIM ... MINID: entries removed."""
        ...

    async def xrange(self, name: Key, min: StreamId = "-", max: StreamId = "+",
                     count: int | None = None) -> list[StreamEntry]:
        """XRANGE: entries, oldest first."""
        ...

    async def xrevrange(self, name: Key, max: StreamId = "+", min: StreamId = "-",
                        count: int | None = None) -> list[StreamEntry]:
        """XREVRANGE: entries, newest first."""
        ...

    async def xread(self, streams: Mapping[Key, StreamId], count: int | None = None,
                    block: int | None = None) -> list[StreamRead]:
        """XREAD: empty when nothing came within `block` ms."""
        ...

    async def xreadgroup(self, groupname: str, consumername: str,
                         streams: Mapping[Key, StreamId], count: int | None = None,
                         block: int | None = None) -> list[StreamRead]:
        """XREADGROUP: empty when nothing came within `block` ms."""
        ...

    async def xgroup_create(self, name: Key, groupname: str, id: StreamId = "$",
                            mkstream: bool = False) -> bool:
        """XGROUP CREATE (raises BUSYGROUP when the group exists)."""
        ...

    async def xclaim(self, name: Key, groupname: str, consumername: str, min_idle_time: int,
                     message_ids: Sequence[StreamId], *, justid: Literal[True]) -> list[bytes]:
        """XCLAIM ... JUSTID: the ids claimed."""
        ...

    async def xautoclaim(self, name: Key, groupname: str, consumername: str,
                         min_idle_time: int, start_id: StreamId = "0-0",
                         count: int | None = None) -> AutoClaim:
        """XAUTOCLAIM: (next start id, claimed entries[, deleted ids])."""
        ...

    async def xinfo_groups(self, name: Key) -> list[GroupInfo]:
        """XINFO GROUPS: one row per consumer group."""
        ...

    async def xinfo_consumers(self, name: Key, groupname: str) -> list[ConsumerInfo]:
        """XINFO CONSUMERS: one row per consumer of the group."""
        ...
