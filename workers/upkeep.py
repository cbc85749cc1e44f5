"""A worker's housekeeping: heartbeat, leases, reclaiming, trimming, dead peers.

- Heartbeat: `keys.heartbeat(id)` is refreshed with a TTL; when it expires the
  worker is dead. Whichever worker first notices (HDEL returns 1) announces
  `worker.down`. Its consumer is then forgotten lane by lane, by a script that
  deletes it only while it holds no pending entry (`workers.lanes`): XGROUP
  DELCONSUMER would orphan them otherwise. The heartbeat and the worker entry
  live in other slots than the lanes, so "is it dead" and "forget it" cannot
  be one script; the order makes that safe: a worker wrongly taken for dead
  (paused past its TTL) loses at most an empty consumer, made again by its
  next read, and says `worker.up` "back" on its next beat.
- Leases: while a batch is being embedded, its entries' idle time is reset
  with `XCLAIM ... JUSTID` (no delivery-count bump), so a slow batch is not
  reclaimed from a live worker.
- Reclaim: entries idle longer than `visibility_timeout_s` belong to a dead
  worker; XAUTOCLAIM takes them. It scans a bounded stretch of the pending
  list per call, so the walk goes on from the cursor it returned, call after
  call, until it wraps: behind a long run of leased entries a dead worker's
  are still found. Past `max_deliveries` entries are poison and are given up
  on (committed as failed) rather than retried forever.
- Trim: XACK never deletes, so the queue streams are trimmed with MINID below
  the oldest entry still pending or not yet delivered, never past it, in one
  script (`workers.lanes`).
- Resume: a worker whose round was cut short by a lost Redis takes up the
  entries it still holds once Redis answers again (`Lanes.resume`), without
  counting a delivery; the visibility timeout is for dead workers.
- Drain: a stopping worker releases the entries it claimed but will not start
  (`Lanes.release`), so peers take them at once instead of after a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import orjson
from redis.exceptions import RedisError, ResponseError

from pipeline import GROUP, honour_cancel
from pipeline.jobs import JobScripts, sweep_jobs
from pipeline.store import feed, text_of
from workers.lanes import Forgotten, Lanes
from workers.work import Entry, parse_entry

if TYPE_CHECKING:
    from pipeline import Keys, QueueLayout, Settings
    from pipeline.model import ModelInfo
    from pipeline.store import AutoClaim, ConsumerInfo, RedisClient

logger = logging.getLogger(__name__)

JANITOR_EVERY_S = 10.0
RECLAIM_COUNT = 64  # XAUTOCLAIM scans at most ten times this many pending entries a call
RECLAIM_PAGES = 16  # calls per reclaim pass before the walk resumes on the next pass


class Upkeep:
    """Heartbeat, lease renewal, reclaiming and cleanup for one worker."""

    def __init__(self, redis: RedisClient, keys: Keys, settings: Settings, worker_id: str,
                 model: ModelInfo, layout: QueueLayout) -> None:
        self.redis = redis
        self.scripts = JobScripts(redis, keys)
        self.keys = keys
        self.settings = settings
        self.worker_id = worker_id
        self.model = model
        self.streams = layout.streams
        self.lanes = Lanes(redis, layout.slot_groups)
        self.info = {"id": worker_id, "model": model.name, "backend": model.backend,
                     "host": socket.gethostname(),
                     "pid": os.getpid(), "started_at": time.time()}
        # A multiset: one entry can be held by two blocks at once (a batch, and the
        # commit of its last call still running after the batch's block has ended).
        self._leased: dict[str, Counter[bytes]] = {}
        self._next_reclaim = 0.0
        self._next_janitor = 0.0
        self._cursors: dict[str, bytes] = {}

    async def register(self) -> None:
        """Create the consumer groups, register the model and this worker, say hello."""
        await self.create_groups()
        await self.beat()
        await feed.publish(self.redis, self.keys, "worker.up", self.info,
                           maxlen=self.settings.feed_maxlen)
        logger.info("worker %s up for model %s", self.worker_id, self.model.name)

    async def create_groups(self) -> None:
        """Create the queue streams' consumer group where it does not exist."""
        for stream in self.streams:
            try:
                # At 0, not $: a group made after jobs were queued must still see them.
                await self.redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def deregister(self) -> None:
        """Leave cleanly: drop the heartbeat and the worker entry, say goodbye."""
        with contextlib.suppress(RedisError):
            await self.redis.delete(self.keys.heartbeat(self.worker_id))
            if await self.redis.hdel(self.keys.workers, self.worker_id):
                await feed.publish(self.redis, self.keys, "worker.down",
                                   {"id": self.worker_id, "reason": "stopped"},
                                   maxlen=self.settings.feed_maxlen)
            await self.forget_consumer(self.worker_id)
        logger.info("worker %s down", self.worker_id)

    async def beat(self) -> bool:
        """Refresh the heartbeat, and the worker and model entries; True if the entry was new.

        Rewriting the entries each beat (not only at start) means a Redis that
        lost its data, or a peer that took this worker for dead, learns again
        within one beat who is alive and serving.
        """
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.heartbeat(self.worker_id), b"1", px=ttl_ms)
            pipe.hset(self.keys.workers, self.worker_id,
                      orjson.dumps({**self.info, "seen_at": time.time()}))
            pipe.hset(self.keys.models, self.model.name, self.model.to_json())
            replies = await pipe.execute()
        return bool(replies[1])

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat and lease renewal every interval; the janitor now and then."""
        interval = min(self.settings.heartbeat_interval_s,
                       self.settings.visibility_timeout_s / 3)
        while not stop.is_set():
            honour_cancel()
            try:
                if await self.beat():
                    await feed.publish(self.redis, self.keys, "worker.up",
                                       {**self.info, "reason": "back"},
                                       maxlen=self.settings.feed_maxlen)
                await self.renew_leases()
                if time.monotonic() >= self._next_janitor:
                    self._next_janitor = time.monotonic() + JANITOR_EVERY_S
                    await self.sweep_dead_workers()
                    await self.trim_queues()
                    await sweep_jobs(self.scripts, self.settings)
            except RedisError:
                logger.warning("upkeep failed; retrying", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    @contextlib.contextmanager
    def leasing(self, entries: Iterable[Entry]) -> Iterator[None]:
        """Keep renewing these entries' leases while the block runs (blocks may nest)."""
        mine = [(entry.stream, entry.entry_id) for entry in entries]
        for stream, entry_id in mine:
            self._leased.setdefault(stream, Counter())[entry_id] += 1
        try:
            yield
        finally:
            # Only this block's hold: the fast lane is served inside a bulk batch's
            # block, and a commit can outlive its batch's block.
            for stream, entry_id in mine:
                held = self._leased[stream]
                held[entry_id] -= 1
                if held[entry_id] <= 0:
                    del held[entry_id]

    def hold(self, entries: Iterable[Entry]) -> contextlib.ExitStack:
        """`leasing(entries)` begun now and ended by the returned stack's close(), for
        entries whose work outlives the caller's block (a task of their own)."""
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.leasing(entries))
            return stack.pop_all()

    async def renew_leases(self) -> None:
        """Reset the idle time of entries being worked on (JUSTID: no delivery bump)."""
        for stream, ids in list(self._leased.items()):
            if ids:
                await self.redis.xclaim(stream, GROUP, self.worker_id, 0, list(ids), justid=True)

    async def reclaim_stale(self) -> tuple[list[Entry], list[Entry]]:
        """Entries idle past the visibility timeout: (to retry, poison to give up on)."""
        if time.monotonic() < self._next_reclaim:
            return [], []
        self._next_reclaim = time.monotonic() + self.settings.visibility_timeout_s / 4
        retry: list[Entry] = []
        poison: list[Entry] = []
        for stream in self.streams:
            claimed = await self._walk(stream)
            for entry in await self.with_deliveries(claimed):
                too_many = entry.deliveries > self.settings.max_deliveries
                (poison if too_many else retry).append(entry)
        if retry or poison:
            logger.warning("reclaimed %d stale entries (%d poison)", len(retry) + len(poison),
                           len(poison))
        return retry, poison

    async def _walk(self, stream: str) -> list[Entry]:
        """Claim stale entries from the last walk's cursor, until some are found or it wraps."""
        min_idle_ms = int(self.settings.visibility_timeout_s * 1000)
        for _ in range(RECLAIM_PAGES):
            start = self._cursors.get(stream, b"0-0")
            reply = await self.redis.xautoclaim(stream, GROUP, self.worker_id, min_idle_ms,
                                                start_id=start, count=RECLAIM_COUNT)
            cursor = _cursor(reply)
            self._cursors[stream] = cursor
            claimed = [e for e in (parse_entry(stream, i, f) for i, f in _claimed(reply)) if e]
            if claimed or cursor == b"0-0":
                return claimed
        return []

    async def with_deliveries(self, entries: list[Entry]) -> list[Entry]:
        """The entries with their delivery counts (from XPENDING: XAUTOCLAIM has none)."""
        if not entries:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry in entries:
                pipe.xpending_range(entry.stream, GROUP, min=entry.entry_id,
                                    max=entry.entry_id, count=1)
            replies = await pipe.execute()
        counted: list[Entry] = []
        for entry, rows in zip(entries, replies, strict=True):
            count = max([int(row["times_delivered"]) for row in rows], default=1)
            counted.append(dataclasses.replace(entry, deliveries=count))
        return counted

    async def resume_own(self) -> list[Entry]:
        """The entries this worker holds, re-leased without counting a delivery
        (`Lanes.resume`), with their delivery counts as they stood."""
        entries = []
        for held in await self.lanes.resume(self.worker_id):
            entry = parse_entry(held.lane, held.entry_id, held.fields)
            if entry is not None:
                entries.append(dataclasses.replace(entry, deliveries=max(held.deliveries, 1)))
        return entries

    async def release(self, entries: list[Entry]) -> int:
        """Hand entries this worker will not start back to its peers, at once."""
        idle_ms = int(self.settings.visibility_timeout_s * 1000) + 1
        released = await self.lanes.release(self.worker_id,
                                            [(e.stream, e.entry_id) for e in entries], idle_ms)
        if released:
            logger.info("released %d entries to other workers", released)
        return released

    async def sweep_dead_workers(self) -> None:
        """Announce and forget workers whose heartbeat expired."""
        for raw_id in await self.redis.hkeys(self.keys.workers):
            worker_id = raw_id.decode()
            if await self.redis.exists(self.keys.heartbeat(worker_id)):
                continue
            if await self.redis.hdel(self.keys.workers, worker_id):
                logger.warning("worker %s stopped answering", worker_id)
                await feed.publish(self.redis, self.keys, "worker.down",
                                   {"id": worker_id, "reason": "heartbeat expired"},
                                   maxlen=self.settings.feed_maxlen)
        live = {w.decode() for w in await self.redis.hkeys(self.keys.workers)}
        gone = {text_of(c["name"]) for stream in self.streams
                for c in await self._consumers(stream)}
        for name in sorted(gone - live):
            await self.forget_consumer(name)

    async def forget_consumer(self, name: str) -> None:
        """Delete a consumer from each lane's group where it holds nothing pending."""
        outcome = await self.lanes.forget(name)
        if Forgotten.FORGOTTEN in outcome.values():
            logger.info("forgot consumer %s", name)

    async def _consumers(self, stream: str) -> list[ConsumerInfo]:
        try:
            return await self.redis.xinfo_consumers(stream, GROUP)
        except ResponseError:
            return []

    async def trim_queues(self) -> None:
        """Drop acked entries: everything below the oldest pending or undelivered one."""
        for trimmed in await self.lanes.trim():
            if trimmed.deleted:
                logger.debug("trimmed %d entries from %s", trimmed.deleted, trimmed.lane)


def _claimed(reply: AutoClaim) -> list[tuple[bytes, Any]]:
    # [next, entries, deleted] on Redis 7+/Valkey; an entry's fields may be
    # None when it was deleted (Redis 6.2 keeps such ids in the PEL).
    if not reply or len(reply) < 2:
        return []
    return [(item[0], item[1]) for item in reply[1] if item and item[0] is not None]


def _cursor(reply: AutoClaim) -> bytes:
    # The next start id; "0-0" once the scan reached the end of the pending list.
    if not reply:
        return b"0-0"
    return reply[0] if isinstance(reply[0], bytes) else str(reply[0]).encode()
