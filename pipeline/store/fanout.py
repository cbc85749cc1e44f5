"""Fan-out: one Redis reader per stream per process, shared by every subscriber in memory.

A `StreamHub` follows one Redis stream (the feed, or one job's events) with
a single blocking XREAD loop and offers each entry to every subscriber's
bounded buffer. A thousand dashboards on one server cost one Redis
connection, not a thousand; a slow subscriber whose buffer fills is dropped
alone (its stream ends, and it resumes with `Last-Event-ID`), while the
reader and everyone else carry on.

A subscriber that resumes from a cursor behind the hub first reads the gap
from Redis (XRANGE, non-blocking, in pages) up to the hub's position when it
subscribed, then the entries the hub buffered for it after that position:
nothing is skipped and nothing is repeated. Subscribing is synchronous, so
no entry can fall between the position read and the registration.

Deliberate choices, so nobody "fixes" them:

- A hub starts with its first subscriber and stops when its last one leaves
  (checked after each read, so at most one `block_ms` later). `Hubs` forgets
  a stopped hub at the moment it stops, in the same step, so a new
  subscriber never joins a dead one.
- The reader never awaits a subscriber: `offer` is synchronous, so a stalled
  client cannot slow the loop.
- `on_idle` lets a job hub notice that its job ended without an `end` entry
  reaching it (it asks after a read that timed out); returning an entry id
  ends the hub with a synthetic end at that id.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from pipeline.tasks import cancel_and_wait, honour_cancel

if TYPE_CHECKING:
    from pipeline.store.connections import RedisClient

logger = logging.getLogger(__name__)

READ_COUNT = 256
RETRY_S = 1.0
IdleCheck = Callable[[str], Awaitable[bool]]
# (interval in seconds, sampler): a hub with a ticker broadcasts a sample each interval.
Ticker = tuple[float, Callable[[], Awaitable[Any]]]


def id_key(entry_id: str) -> tuple[int, int]:
    """A stream id as a sortable pair (`"5-1"` -> (5, 1)); a bare `"5"` is (5, 0)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Entry:
    """One stream entry as the hub read it (field names and values decoded).

    A synthetic entry (a stats tick, an end the hub inferred) is not in the
    stream: every subscriber gets it whatever its cursor, and it moves no cursor.
    """

    id: str
    fields: dict[str, Any]
    synthetic: bool = False


END = "end"


class SubscriberDropped(Exception):
    """The subscriber fell `limit` entries behind and was dropped; it should resume."""


@dataclass(eq=False)
class Subscription:
    """One subscriber's bounded buffer of entries after `start`."""

    start: str
    limit: int
    _items: deque[Entry] = field(default_factory=deque)
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: bool = False
    ended: bool = False

    def offer(self, entry: Entry) -> bool:
        """Buffer an entry; False (and dropped) when the buffer is full."""
        if self.dropped:
            return False
        if len(self._items) >= self.limit:
            self.dropped = True
            self._items.clear()
            self._ready.set()
            return False
        self._items.append(entry)
        self._ready.set()
        return True

    def end(self) -> None:
        """No more entries will come (the stream ended or the hub stopped)."""
        self.ended = True
        self._ready.set()

    async def get(self) -> Entry | None:
        """The next buffered entry; None once ended and drained."""
        while not self._items:
            if self.dropped:
                raise SubscriberDropped(f"fell {self.limit} entries behind")
            if self.ended:
                return None
            self._ready.clear()
            await self._ready.wait()
        if self.dropped:
            raise SubscriberDropped(f"fell {self.limit} entries behind")
        return self._items.popleft()


class StreamHub:
    """One reader of one Redis stream, fanning entries out to subscriptions."""

    def __init__(
        self, redis: RedisClient, blocking: RedisClient, stream: str, *,
        block_ms: int, buffer: int, on_idle: IdleCheck | None = None,
        on_stop: Callable[[StreamHub], None] | None = None, tick: Ticker | None = None,
    ) -> None:
        self.redis = redis
        self.blocking = blocking
        self.stream = stream
        self.block_ms = block_ms
        self.buffer = buffer
        self.on_idle = on_idle
        self.on_stop = on_stop
        self.tick = tick
        self.latest_tick: Entry | None = None
        self.position = "0-0"
        self.subscriptions: set[Subscription] = set()
        self.stopped = False
        self._started: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def ready(self) -> None:
        """Wait until the hub knows its position and reads (first caller starts it)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        newest = await self.redis.xrevrange(self.stream, count=1)
        self.position = newest[0][0].decode() if newest else "0-0"
        self._reader = asyncio.create_task(self._read(), name=f"hub {self.stream}")
        if self.tick is not None:
            self._ticker = asyncio.create_task(self._tick(self.tick), name=f"tick {self.stream}")

    def subscribe(self) -> Subscription:
        """A new subscription from the hub's position (call after `ready`)."""
        subscription = Subscription(self.position, self.buffer)
        if self.stopped:
            subscription.end()
        else:
            self.subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget a subscription (its reader stops once none is left)."""
        self.subscriptions.discard(subscription)

    async def _read(self) -> None:
        try:
            while True:
                honour_cancel()
                try:
                    if await self._read_once():
                        return
                except RedisError:
                    logger.warning("reader of %s lost Redis; retrying", self.stream,
                                   exc_info=True)
                    await asyncio.sleep(RETRY_S)
                # Checked after a read, not before: the first subscriber joins just
                # after the reader starts.
                if not self.subscriptions:
                    return
        finally:
            self._stop()

    async def _read_once(self) -> bool:
        """One blocking read, delivered; True when the stream has ended."""
        reply = await self.blocking.xread({self.stream: self.position}, count=READ_COUNT,
                                          block=self.block_ms)
        if reply:
            ended = False
            for entry_id, fields in reply[0][1]:
                entry = Entry(entry_id.decode(),
                              {k.decode(): v.decode() for k, v in fields.items()})
                self.position = entry.id
                self.broadcast(entry)
                ended = ended or entry.fields.get("type") == END
            return ended
        if self.on_idle is not None and await self.on_idle(self.position):
            self.broadcast(Entry(self.position, {"type": END}, synthetic=True))
            return True
        return False

    def broadcast(self, entry: Entry) -> None:
        """Offer an entry to every subscription; drop those whose buffer is full."""
        for subscription in list(self.subscriptions):
            if not subscription.offer(entry):
                self.subscriptions.discard(subscription)

    async def _tick(self, tick: Ticker) -> None:
        interval_s, sample = tick
        while not self.stopped:
            honour_cancel()
            try:
                data = await sample()
            except RedisError:
                logger.warning("stats sample for %s failed", self.stream, exc_info=True)
            else:
                self.latest_tick = Entry(self.position, {"type": "stats", "data": data},
                                         synthetic=True)
                self.broadcast(self.latest_tick)
            await asyncio.sleep(interval_s)

    def _stop(self) -> None:
        self.stopped = True
        if self._ticker is not None:
            self._ticker.cancel()
        for subscription in self.subscriptions:
            subscription.end()
        self.subscriptions.clear()
        if self.on_stop is not None:
            self.on_stop(self)

    async def close(self) -> None:
        """Stop reading now (the process is shutting down)."""
        if self._reader is not None:
            await cancel_and_wait(self._reader)
        if not self.stopped:
            self._stop()

    async def history(self, after: str, until: str) -> AsyncGenerator[Entry, None]:
        """Entries after `after` up to and including `until`, read in pages."""
        cursor = after
        while id_key(cursor) < id_key(until):
            page = await self.redis.xrange(self.stream, f"({cursor}", until, count=READ_COUNT)
            if not page:
                return
            for entry_id, fields in page:
                cursor = entry_id.decode()
                yield Entry(cursor, {k.decode(): v.decode() for k, v in fields.items()})

    async def entries(self, after: str | None) -> AsyncGenerator[Entry, None]:
        """Every entry after `after` (None: only new ones), live, until the stream ends."""
        await self.ready()
        subscription = self.subscribe()
        last = subscription.start if after is None else after
        try:
            if id_key(last) < id_key(subscription.start):
                async for entry in self.history(last, subscription.start):
                    last = entry.id
                    yield entry
            while (live := await subscription.get()) is not None:
                if live.synthetic:
                    yield live
                elif id_key(live.id) > id_key(last):
                    last = live.id
                    yield live
        finally:
            self.unsubscribe(subscription)


class Hubs:
    """The process's hubs, one per stream, created on demand and forgotten when they stop."""

    def __init__(self, redis: RedisClient, blocking: RedisClient, *, block_ms: int,
                 buffer: int) -> None:
        self.redis = redis
        self.blocking = blocking
        self.block_ms = block_ms
        self.buffer = buffer
        self._hubs: dict[str, StreamHub] = {}

    def hub(self, stream: str, *, on_idle: IdleCheck | None = None,
            tick: Ticker | None = None) -> StreamHub:
        """The live hub of `stream`, or a new one."""
        hub = self._hubs.get(stream)
        if hub is None or hub.stopped:
            hub = StreamHub(self.redis, self.blocking, stream, block_ms=self.block_ms,
                            buffer=self.buffer, on_idle=on_idle, on_stop=self._forget,
                            tick=tick)
            self._hubs[stream] = hub
        return hub

    def find(self, stream: str) -> StreamHub | None:
        """The live hub of `stream`, if any (without creating one)."""
        hub = self._hubs.get(stream)
        return hub if hub is not None and not hub.stopped else None

    def _forget(self, hub: StreamHub) -> None:
        if self._hubs.get(hub.stream) is hub:
            del self._hubs[hub.stream]

    @property
    def active(self) -> int:
        """How many streams this process is reading now."""
        return len(self._hubs)

    async def close(self) -> None:
        """Stop every reader."""
        for hub in list(self._hubs.values()):
            await hub.close()
