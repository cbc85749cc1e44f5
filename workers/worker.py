"""The worker: claim chunks from the queue, embed them in batches, commit, ack.

Order of a batch, and why it is crash-safe at every step:

1. XREADGROUP claims entries (`workers.claims`; they enter this consumer's
   pending list).
2. The model embeds them (in a thread; the event loop keeps renewing the
   lease on the claimed entries so nobody reclaims a slow batch).
3. One pipeline sends each chunk's commit script; once all have answered, a
   second one sends XACK for every entry (`workers.commits` says why two).
   A crash before 3 leaves the entries pending: another worker reclaims them
   after `visibility_timeout_s` (XAUTOCLAIM) and redoes the work. A crash in
   the middle of 3 leaves some chunks committed but not acked: on redelivery
   their done marker is set, so they are only acked.

The fast lane is read before the bulk lane, and a batch mixes chunks of
several jobs up to `batch_max_texts`.

Draining: once `stop` is set, the worker finishes the model call in hand,
commits and acks it, releases the entries it claimed but has not started
(peers reclaim them at once, see `workers.lanes`), deregisters and returns.
Heartbeat and lease renewal go on until then, so a long last batch is neither
reclaimed nor its worker announced dead. Exiting at once on a second signal
is the CLI's: the entries in hand stay pending and are reclaimed after the
visibility timeout.

A batch is embedded in several short model calls (`workers.model_calls`);
between two of them the worker serves the fast lane, so an interactive
request waits for at most about one call, not for a whole bulk batch. A
worker claims at most one model call's worth of fast-lane texts at a time,
so it never sits on interactive work while its peers idle.

Redis overlaps the model: the commit of a group (a bulk batch's, or the
replies to fast-lane requests) runs while the worker claims and embeds the
next (`Commits.finish_behind`), and the next bulk batch is read and loaded,
its jobs marked running and its texts looked up in the cache
(`ModelCalls.look_up`), while the model embeds the last call of one
(`ReadAhead`; only the jobs' statuses are read again before it is embedded,
so a job cancelled meanwhile is not). With `overlap` False they run in line:
embed, commit, read (`bench/overlap.py` compares the two).

A worker is built whole: `Worker.start` opens its two connections (one for
blocking reads) and builds every part on them, and closes them when its
block ends; `run_worker` does that and runs the worker until `stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline import GROUP, Backoff, Keys, cancel_and_wait, honour_cancel, tracing
from pipeline.model import backend_of
from pipeline.store import Partitions, connect, metrics
from workers.batch import batches, embed_attempted, failed_result, open_attempts
from workers.cache import EmbeddingCache, cache_scope, fingerprint
from workers.claims import Claims
from workers.commits import Commits
from workers.model_calls import BetweenCalls, ModelCalls
from workers.upkeep import Upkeep
from workers.work import Entry, Work, parse_reply

if TYPE_CHECKING:
    from pipeline import QueueLayout, Settings
    from pipeline.model import Embedder
    from pipeline.store import RedisClient
    from workers.batch import Loaded
    from workers.cache import Cached, Scoped

logger = logging.getLogger(__name__)


def new_worker_id() -> str:
    """host-pid-random: readable in XINFO CONSUMERS, unique across restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def run_worker(settings: Settings, embedder: Embedder, stop: asyncio.Event,
                     ready: asyncio.Event | None = None, worker_id: str | None = None) -> None:
    """Start a worker, run it until `stop` is set (see `Worker.run`), and close it."""
    async with Worker.start(settings, embedder, worker_id) as worker:
        await worker.run(stop, ready)


class Worker:
    """One worker process's loop over the queue of one model, built on its clients.

    `Worker.start` opens the clients and closes them after; a caller that hands
    in clients of its own closes them itself.
    """

    def __init__(self, settings: Settings, embedder: Embedder, worker_id: str,
                 redis: RedisClient, blocking: RedisClient,
                 layout: QueueLayout | None = None) -> None:
        self.settings = settings
        self.embedder = embedder
        self.worker_id = worker_id
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.layout = layout or self.keys.layout(embedder.info.name)
        self.streams = self.layout.streams
        # A custom embedder (a test's fake) says nothing: it is what the settings named.
        self.backend = backend_of(embedder) or settings.backend
        info = dataclasses.replace(embedder.info, backend=self.backend)
        self.upkeep = Upkeep(redis, self.keys, settings, worker_id, info, self.layout)
        self.commits = Commits(redis, self.keys, settings, worker_id, self.upkeep,
                               max_seq_length=info.max_seq_length, backend=self.backend)
        self.claims = Claims(redis, blocking, self.upkeep, settings, worker_id, self.layout,
                             prepare=self._prepare)
        self.calls = ModelCalls(embedder, self._cache(), max_texts=settings.call_max_texts,
                                max_tokens=settings.call_max_tokens, busy=self.claims.busy)
        self.stopping = asyncio.Event()  # the `stop` that `run` is given
        # How often each entry still held was resumed after a lost round (`_resume_own`).
        self._resumed: Counter[tuple[str, bytes]] = Counter()
        self.overlap = True

    @classmethod
    @contextlib.asynccontextmanager
    async def start(cls, settings: Settings, embedder: Embedder,
                    worker_id: str | None = None) -> AsyncIterator[Worker]:
        """A worker on connections of its own to `settings.redis_url`, closed after the block."""
        assert settings.redis_url, "the worker needs a Redis URL"
        redis = connect(settings.redis_url)
        blocking = connect(settings.redis_url, blocking=True, max_connections=4)
        try:
            layout = await _queue_layout(redis, settings, embedder.info.name)
            yield cls(settings, embedder, worker_id or new_worker_id(), redis, blocking, layout)
        finally:
            await redis.aclose()
            await blocking.aclose()

    def _cache(self) -> EmbeddingCache | None:
        """The shared cache, for embedders that say which revision of the model they run."""
        scope = cache_scope(self.settings)  # a wrong scope fails the start, cache or not
        revision = getattr(self.embedder, "revision", None)
        if not self.settings.cache or revision is None:
            return None
        name = fingerprint(self.embedder.info.name, str(revision), self.backend,
                           self.settings.dtype)
        return EmbeddingCache(self.redis, self.keys, name, ttl_s=self.settings.cache_ttl_s,
                              max_entries=self.settings.cache_max_entries, scope=scope)

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Work until `stop` is set; finish the batch in hand, then deregister."""
        self.stopping = stop
        if not await self._register(stop):
            return
        # Upkeep has its own stop: it must outlive the drain of the last batch.
        upkeep_stop = asyncio.Event()
        upkeep_task = asyncio.create_task(self.upkeep.run(upkeep_stop))
        if ready is not None:
            ready.set()
        try:
            await self._loop(stop)
            await self.claims.ahead.hand_back()
            await self.claims.hand_back()
            await self.commits.settle()  # the last commit lands before the goodbye
            await self.calls.stored()
        finally:
            # Cancelled, or failed: neither the read ahead nor a commit is left running.
            await self.claims.ahead.cancel()
            await self.claims.cancel()
            await self.commits.cancel()
            await self.calls.cancel()
            upkeep_stop.set()
            await cancel_and_wait(upkeep_task)
            await self.upkeep.deregister()

    async def _prepare(self, entries: list[Entry]) -> Loaded:
        """A batch read ahead: its work loaded, its jobs marked running, its texts looked
        up in the cache, all while the model embeds the batch before."""
        loaded = await self.commits.prepare(entries)
        loaded.found = await self.calls.look_up(loaded.work)
        return loaded

    async def _register(self, stop: asyncio.Event) -> bool:
        """Register, retrying while Redis is away; False if stopped first."""
        backoff = Backoff()
        while not stop.is_set():
            try:
                await self.upkeep.register()
                return True
            except (RedisConnectionError, RedisTimeoutError) as exc:
                pause = backoff.next_s()
                logger.warning("cannot reach Redis to register (%s); retrying in %.1fs",
                               exc, pause)
                await _wait(stop, pause)
        return False

    async def _loop(self, stop: asyncio.Event) -> None:
        """Work round after round; a lost Redis (or one failing over) is waited out.

        Every error that means Redis is away or changing hands reaches here as a
        ConnectionError (`pipeline.store.connections`): the round's entries stay
        pending, to be finished by whoever claims them, and the worker goes on.
        """
        backoff = Backoff()
        step = self._drain_own_pending
        while not stop.is_set():
            honour_cancel()
            try:
                await step()
                step = self._work_once
                backoff.reset()
            except (RedisConnectionError, RedisTimeoutError) as exc:
                pause = backoff.next_s()
                logger.warning("lost Redis (%s); retrying in %.1fs", exc, pause)
                await _wait(stop, pause)
                step = self._resume_own
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    # Redis lost its data (restarted without persistence, or flushed):
                    # make the groups again and carry on.
                    logger.warning("consumer groups are gone; creating them again")
                    step = self.upkeep.create_groups
                    continue
                logger.exception("Redis refused a command; retrying")
                await _wait(stop, backoff.next_s())
            except Exception:
                # A bug in one batch must not take the worker down: its entries
                # stay pending and are retried, then given up on as poison.
                logger.exception("batch failed")
                await _wait(stop, 1.0)
                step = self._work_once

    async def _work_once(self) -> None:
        """Claim entries and embed and commit them."""
        entries = await self._claim()
        if entries:
            try:
                await self.process(entries)
            finally:
                self.claims.ahead.drop_hold()

    async def _drain_own_pending(self) -> None:
        """On start, finish what this consumer name claimed before a restart."""
        claimed: list[Entry] = []
        for streams in self.layout.slot_groups:  # one XREADGROUP reads one slot
            reply = await self.redis.xreadgroup(GROUP, self.worker_id,
                                                dict.fromkeys(streams, "0"), count=1000)
            claimed += parse_reply(reply)
        entries = await self.upkeep.with_deliveries(claimed)
        if entries:
            logger.info("resuming %d entries left pending by a previous run", len(entries))
            await self.process(entries)

    async def _resume_own(self) -> None:
        """After a round lost with Redis: take up at once the entries this worker still
        holds (claimed, read ahead, in a commit that failed), without counting a delivery
        (`Upkeep.resume_own`). An entry whose rounds keep failing so is resumed at most
        `max_deliveries` times; then it waits out the visibility timeout like any other,
        and its reclaim counts."""
        await self.claims.ahead.discard()
        await self.claims.cancel()
        with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
            await self.commits.settle()  # a failed commit's entries are pending: resumed
        entries = await self.upkeep.resume_own()
        keys = [(e.stream, e.entry_id) for e in entries]
        self._resumed = Counter({key: self._resumed[key] + 1 for key in keys})
        entries = [e for e, key in zip(entries, keys, strict=True)
                   if self._resumed[key] <= self.settings.max_deliveries]
        if entries:
            logger.info("resuming %d entries this worker held when it lost Redis", len(entries))
            await self.process(entries)

    async def _claim(self) -> list[Entry]:
        """Reclaimed stale entries first, then the lanes (`Claims.claim`)."""
        stale, poison = await self.upkeep.reclaim_stale()
        if poison:
            await self.give_up(poison)
        if stale:
            return stale
        return await self.claims.claim()

    async def _serve_fast_lane(self) -> None:
        """Between two model calls of a bulk batch: embed and commit waiting fast-lane work."""
        if self.stopping.is_set():
            return  # draining: claim nothing new
        entries = await self.claims.claim_between_calls()
        if entries:
            await self.process(entries, interruptible=False)

    async def process(self, entries: list[Entry], interruptible: bool = True) -> None:
        """Embed and commit claimed entries, at most `batch_max_texts` texts a batch.

        Fast-lane entries claimed together with bulk ones go first, on their own:
        sorted in with the bulk texts by length they could land in the last call.
        Only bulk work is interrupted for the fast lane (and cut finer meanwhile).
        """
        fast = [e for e in entries if e.stream == self.layout.fast]
        bulk = [e for e in entries if e.stream != self.layout.fast]
        if fast:
            await self._process(fast, interruptible=False)
        if bulk:
            await self._process(bulk, interruptible)

    async def _process(self, entries: list[Entry], interruptible: bool) -> None:
        if self.stopping.is_set():  # claimed as the stop came: not started, so handed back
            await self.upkeep.release(entries)
            return
        # Read ahead, the batch was loaded while the model embedded the one before:
        # only its jobs' statuses are read again.
        ahead = self.claims.ahead.loaded(entries)
        loaded = await self.commits.recheck(ahead) if ahead is not None \
            else await self.commits.prepare(entries)
        work = await self.commits.sort_out(loaded)
        if not work:
            return
        # A redelivered chunk may have killed the worker that held it: alone it goes.
        steps = [[w] for w in work if w.entry.deliveries > 1]
        steps += batches([w for w in work if w.entry.deliveries == 1],
                         self.settings.batch_max_texts)
        between = self._serve_fast_lane if interruptible else None
        # Commits run behind the next model call; only bulk batches are read ahead.
        behind = self.overlap
        read_ahead = behind and work[0].entry.stream != self.layout.fast
        with self.upkeep.leasing(w.entry for w in work):
            for number, group in enumerate(steps):
                if number and self.stopping.is_set():
                    await self.upkeep.release([w.entry for g in steps[number:] for w in g])
                    return
                if read_ahead and number == len(steps) - 1 and not self.stopping.is_set():
                    self.claims.ahead.start()
                with tracing.batch(w.entry for w in group):  # nothing when tracing is off
                    embed_s = await self._embed(group, between, loaded.found)
                    if behind:
                        await self.commits.finish_behind(group, embed_s)
                    else:
                        await self.commits.finish(group, embed_s)

    async def _embed(self, group: list[Work], between: BetweenCalls | None,
                     found: dict[Scoped, Cached] | None) -> float:
        """Fill the group's vectors (`found`: the cache's answers, if read ahead); the
        seconds it took."""
        started = time.perf_counter()
        if group[0].entry.deliveries > 1:
            await embed_attempted(self.redis, self.keys, self.calls.model, group[0],
                                  self.settings.result_ttl_s, self.worker_id)
        else:
            await self.calls.embed(group, between_calls=between, found=found)
        return time.perf_counter() - started

    async def give_up(self, entries: list[Entry]) -> None:
        """Commit poison chunks as failed, so their jobs can still finish."""
        work = await self.commits.load(entries)
        # A chunk whose last delivery died with an input in hand is not stuck: each
        # such death names one more input to give up, so it goes on, alone.
        progressing = await open_attempts(self.redis, self.keys, work)
        if progressing:
            await self.process([w.entry for w in progressing])
            work = [w for w in work if all(w is not p for p in progressing)]
        if not work:
            return
        reason = (f"gave up after {self.settings.max_deliveries} deliveries: no attempt to "
                  "embed this input produced a result (a worker crashed or failed on it)")
        dims = self.embedder.info.dimensions
        logger.error("giving up on %d poison chunks", len(work))
        results = [failed_result(w, reason, w.dimensions or dims) for w in work]
        await self.commits.commit(results, [w.entry for w in work])
        await metrics.record_given_up(self.redis, self.keys, sum(len(w.texts) for w in work))


async def _queue_layout(redis: RedisClient, settings: Settings, model: str) -> QueueLayout:
    """The model's queue layout, asked of Redis until it answers (it may be failing over)."""
    backoff = Backoff()
    while True:
        try:
            return await Partitions(redis, Keys(settings.key_prefix), settings).layout(model)
        except (RedisConnectionError, RedisTimeoutError) as exc:
            pause = backoff.next_s()
            logger.warning("cannot reach Redis to read the queue layout (%s); retrying in "
                           "%.1fs", exc, pause)
            await asyncio.sleep(pause)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
