"""Claiming queue entries: the fast lane first, then the bulk lane, then the next
bulk batch read ahead while the model embeds the last call of this one.

- The fast lane is claimed an entry at a time, up to one model call's worth
  of texts, by one script (`workers.lanes`): an entry may carry up to
  `fast_lane_max_texts` texts, and reading a whole batch's count of entries
  at once is how one worker came to hoard the lane while its peers idled.
- With the fast lane empty, the bulk lane's partitions (`QueueLayout`) are
  read without blocking, each read starting one partition further on, up to
  `batch_max_texts`; with nothing there either, a blocking read takes at
  most one entry of the fast lane and bulk partition 0 (one slot, so one
  XREADGROUP), and the partitions are then read on. Every bulk job puts its
  first chunk on partition 0, so an idle worker wakes for any of them.
- Read-ahead: while the model embeds a bulk batch's last call, the next
  batch is read (`ReadAhead`), and its work loaded and its jobs marked
  running (`Commits.prepare`), so the model's next call waits for none of
  those round trips. Its entries are leased from the moment they are read
  (`Upkeep.hold`), so they are not taken for stale while they wait for the
  model, and the hold lasts until their batch is processed. A stopping
  worker hands them back to its peers at once (`Upkeep.release`): read, but
  never started (their jobs stay marked running: they are, by whoever takes
  the entries next). A worker that dies with them leaves them pending, as
  any claimed entry, to be reclaimed after the visibility timeout.

Entries idle past the visibility timeout are reclaimed before any of these,
by the worker's upkeep (`Upkeep.reclaim_stale`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from pipeline import GROUP, cancel_and_wait
from workers.model_calls import BUSY_S
from workers.work import Entry, parse_reply

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from pipeline import QueueLayout, Settings
    from pipeline.store import RedisClient
    from workers.batch import Loaded
    from workers.upkeep import Upkeep

    Prepare = Callable[[list[Entry]], Awaitable[Loaded]]
    ReadBatch = tuple[list[Entry], contextlib.ExitStack, Loaded | None]

class ReadAhead:
    """The next bulk batch, claimed and loaded while the model embeds this batch's
    last call."""

    def __init__(self, upkeep: Upkeep, settings: Settings, worker_id: str,
                 read_bulk: Callable[[int], Awaitable[list[Entry]]],
                 prepare: Prepare | None = None) -> None:
        self.upkeep = upkeep
        self.settings = settings
        self.worker_id = worker_id
        self.read_bulk = read_bulk
        self.prepare = prepare
        self._reading: asyncio.Task[ReadBatch] | None = None
        self._held: contextlib.ExitStack | None = None
        self._taken: list[Entry] = []
        self._loaded: Loaded | None = None

    def start(self) -> None:
        """Begin reading the next batch, unless a read is already under way."""
        if self._reading is None:
            self._reading = asyncio.create_task(self.read(), name=f"read-ahead {self.worker_id}")

    async def read(self) -> ReadBatch:
        """Up to a batch of bulk entries, without blocking, and their work prepared;
        leased from the moment they are read, so they are not taken for stale while
        they wait for the model."""
        entries = await self.read_bulk(self.settings.batch_max_texts // self.settings.chunk_size)
        held = self.upkeep.hold(entries)
        try:
            loaded = await self.prepare(entries) if entries and self.prepare else None
        except BaseException:
            held.close()  # pending, unleased: reclaimed after the visibility timeout
            raise
        return entries, held, loaded

    async def take(self) -> list[Entry]:
        """The entries read ahead, if a read was begun; held until `drop_hold`."""
        if self._reading is None:
            return []
        task, self._reading = self._reading, None
        entries, self._held, self._loaded = await task
        self._taken = entries
        return entries

    def loaded(self, entries: list[Entry]) -> Loaded | None:
        """What `prepare` made of `entries`, if they are the entries taken last."""
        if self._loaded is None or _ids(entries) != _ids(self._taken):
            return None
        return self._loaded

    def drop_hold(self) -> None:
        """End the lease hold on the entries taken last (their batch is processed)."""
        held, self._held = self._held, None
        self._taken, self._loaded = [], None
        if held is not None:
            held.close()

    async def hand_back(self) -> None:
        """Stopping: entries read ahead and never started go back to the peers at once."""
        entries = await self.take()
        try:
            if entries:
                await self.upkeep.release(entries)
        finally:
            self.drop_hold()

    async def cancel(self) -> None:
        """Stop a read still under way (the worker is leaving on an error or a cancel)."""
        if self._reading is not None:
            await cancel_and_wait(self._reading)

    async def discard(self) -> None:
        """Forget the read ahead, done or not (a lost round: what it read stays pending)."""
        await self.cancel()
        self._reading = None
        self.drop_hold()


class Claims:
    """Where a worker's next entries come from: the fast lane, read-ahead, the bulk lane."""

    def __init__(self, redis: RedisClient, blocking: RedisClient, upkeep: Upkeep,
                 settings: Settings, worker_id: str, layout: QueueLayout,
                 prepare: Prepare | None = None) -> None:
        self.redis = redis
        self.blocking = blocking
        self.upkeep = upkeep
        self.settings = settings
        self.worker_id = worker_id
        self.fast, self.bulks = layout.fast, layout.bulks
        self.ahead = ReadAhead(upkeep, settings, worker_id, self.read_bulk, prepare)
        self._fast_served_at = -BUSY_S
        self._turn = 0
        # Blocking reads left running between calls: the fast lane's listener, and,
        # while it runs, the wait on bulk partition 0 of an idle worker.
        self._listening: asyncio.Task[list[Entry]] | None = None
        self._watching: asyncio.Task[list[Entry]] | None = None

    async def claim(self) -> list[Entry]:
        """The fast lane, then the batch read ahead, then the bulk partitions, then a
        blocking read of the fast lane and bulk partition 0 (which share a slot)."""
        entries = await self.claim_fast()
        if entries:
            return entries  # alone: the bulk lane can wait one short batch
        entries = _harvest(self._take_watched()) or await self.ahead.take()
        if entries:
            return entries
        entries = await self.read_bulk(self._room([]))
        if entries:
            return entries
        entries = await self._wait_idle()
        if any(e.stream == self.fast for e in entries):
            self._fast_served_at = time.monotonic()
        if entries:
            entries += await self.read_bulk(self._room(entries))
        return entries

    async def _wait_idle(self) -> list[Entry]:
        """Nothing to do: wait up to `block_ms` for a fast or a bulk entry."""
        if self._listening is None:
            # COUNT is per stream: one entry of each lane at most.
            return parse_reply(await self.blocking.xreadgroup(
                GROUP, self.worker_id, {self.fast: ">", self.bulks[0]: ">"}, count=1,
                block=self.settings.block_ms))
        # The fast lane's listener still waits: wait on it and on bulk partition 0.
        if self._watching is None:
            self._watching = asyncio.create_task(self._block_on(self.bulks[0]))
        await asyncio.wait({self._listening, self._watching},
                           return_when=asyncio.FIRST_COMPLETED)
        return self._take_listened() + _harvest(self._take_watched())

    def _take_watched(self) -> asyncio.Task[list[Entry]] | None:
        """The wait on bulk partition 0, once it has answered (and is forgotten)."""
        if self._watching is None or not self._watching.done():
            return None
        watched, self._watching = self._watching, None
        return watched

    async def _block_on(self, stream: str) -> list[Entry]:
        return parse_reply(await self.blocking.xreadgroup(
            GROUP, self.worker_id, {stream: ">"}, count=1, block=self.settings.block_ms))

    def _take_listened(self) -> list[Entry]:
        """What the fast lane's listener read, once it has answered (it is then done)."""
        if self._listening is None or not self._listening.done():
            return []
        listened, self._listening = self._listening, None
        return _harvest(listened)

    async def claim_between_calls(self) -> list[Entry]:
        """Fast-lane work between two model calls of a bulk batch, at no command's cost
        while there is none: a blocking read of the fast lane (the listener) is left
        running across calls, and the lane is claimed once it has answered with an entry.
        Checking with a command before every call made the fast lane's primary answer
        most of the queue's commands."""
        if self._listening is None:
            entries = await self.claim_fast()  # what waits now, then listen for more
            self._listening = asyncio.create_task(self._block_on(self.fast))
            return entries
        return await self.claim_fast()

    async def hand_back(self) -> None:
        """Stopping: the listener's and the watch's reads end within `block_ms`; what
        they read goes back to the peers at once."""
        entries: list[Entry] = []
        tasks = [t for t in (self._listening, self._watching) if t is not None]
        self._listening = self._watching = None
        for task in tasks:
            await asyncio.wait({task})
            with contextlib.suppress(RedisError):  # it read nothing, then
                entries += _harvest(task)
        if entries:
            await self.upkeep.release(entries)

    async def cancel(self) -> None:
        """Stop the reads left running (the worker is leaving on an error or a cancel);
        an entry one of them had just read is reclaimed after the visibility timeout."""
        for task in (self._listening, self._watching):
            if task is not None:
                await cancel_and_wait(task)
        self._listening = self._watching = None

    def _room(self, entries: list[Entry]) -> int:
        """Bulk chunks a batch holding `entries` still has room for."""
        return (self.settings.batch_max_texts - sum(e.size for e in entries)) \
            // self.settings.chunk_size

    async def read_bulk(self, room: int) -> list[Entry]:
        """Up to `room` bulk chunks without blocking, from the partitions in turn: each
        read starts one partition further on, so none waits behind the others."""
        entries: list[Entry] = []
        count = len(self.bulks)
        start, self._turn = self._turn, (self._turn + 1) % count
        for step in range(count):
            if room <= 0:
                break
            stream = self.bulks[(start + step) % count]
            got = parse_reply(await self.redis.xreadgroup(GROUP, self.worker_id,
                                                          {stream: ">"}, count=room))
            entries += got
            room -= len(got)
        return entries

    async def claim_fast(self) -> list[Entry]:
        """Fast-lane entries, one at a time, up to one model call's worth of texts: what
        the listener read first, if it runs (nothing, and no command, until it answers)."""
        listened: list[Entry] = []
        if self._listening is not None:
            listened = self._take_listened()
            if not listened:
                return []
        budget = self.settings.call_max_texts - sum(e.size for e in listened)
        claimed = await self.upkeep.lanes.claim(self.fast, self.worker_id, budget) \
            if budget > 0 else []
        entries = listened + parse_reply([(self.fast, claimed)])
        if entries:
            self._fast_served_at = time.monotonic()
        return entries

    def busy(self) -> bool:
        """Whether interactive work came in the last `BUSY_S` (bulk calls are cut finer)."""
        return time.monotonic() - self._fast_served_at < BUSY_S


def _ids(entries: list[Entry]) -> list[tuple[str, bytes]]:
    return [(e.stream, e.entry_id) for e in entries]


def _harvest(task: asyncio.Task[list[Entry]] | None) -> list[Entry]:
    """The entries a finished read got ([] if it is still running, or absent); the
    error it met is raised, as the read's own would be."""
    if task is None or not task.done():
        return []
    return task.result()
