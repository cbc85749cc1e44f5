"""The worker: claim chunks from the queue, embed them in batches, commit, ack.

Order of a batch, and why it is crash-safe at every step:

1. XREADGROUP claims entries (they enter this consumer's pending list).
2. The model embeds them (in a thread; the event loop keeps renewing the
   lease on the claimed entries so nobody reclaims a slow batch).
3. One pipeline sends each chunk's commit script; once all have answered, a
   second one sends XACK for every entry (on a cluster one pipeline would
   run the nodes' parts in parallel, acking before committing).
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
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline import GROUP, Keys, cancel_and_wait, honour_cancel
from pipeline.jobs import Committed, JobScripts, announce, announce_created
from pipeline.model import backend_of
from pipeline.store import connect, feed, metrics
from workers import replies as interactive
from workers.batch import chunk_result, embed_attempted, failed_result, load_work, open_attempts
from workers.cache import EmbeddingCache, fingerprint
from workers.model_calls import BUSY_S, BetweenCalls, ModelCalls
from workers.upkeep import Upkeep
from workers.work import Entry, Work, parse_entry

if TYPE_CHECKING:
    from pipeline import Settings
    from pipeline.jobs import ChunkResult
    from pipeline.model import Embedder
    from pipeline.store import RedisClient

logger = logging.getLogger(__name__)

# torch pays more per model call than ONNX Runtime does, so its calls are twice
# the size. A torch bulk job through the whole pipeline ran at 0.76 of
# `SentenceTransformer.encode` in calls of 32 against 0.72 in calls of 16; the
# model alone (`bench/torch_calls.py`) gains less, within its noise.
TORCH_CALL_SCALE = 2

ReadAhead = tuple[list[Entry], contextlib.ExitStack]


def new_worker_id() -> str:
    """host-pid-random: readable in XINFO CONSUMERS, unique across restarts."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Worker:
    """One worker process's loop over the queue of one model."""

    def __init__(self, settings: Settings, embedder: Embedder, worker_id: str | None = None):
        self.settings = settings
        self.embedder = embedder
        self.model = embedder.info.name
        self.keys = Keys(settings.key_prefix)
        self.worker_id = worker_id or new_worker_id()
        self.streams = self.keys.queues(self.model)
        self.redis: RedisClient | None = None
        self.blocking: RedisClient | None = None
        self.upkeep: Upkeep | None = None
        self.scripts: JobScripts | None = None
        self.stopping = asyncio.Event()
        # A custom embedder (a test's fake) says nothing: it is what the settings named.
        self.backend = backend_of(embedder) or settings.backend
        scale = TORCH_CALL_SCALE if self.backend == "torch" else 1
        self.calls = ModelCalls(embedder, None, max_texts=settings.call_max_texts * scale,
                                max_tokens=settings.call_max_tokens * scale,
                                busy=self._fast_lane_busy)
        self._fast_served_at = -BUSY_S
        # Bulk batches overlap Redis with the model: the commit of one runs while the
        # model embeds the next (`_commit_behind`, one at a time), and the next is
        # read while the model embeds the last group of one (`_read_ahead`).
        # False: embed, commit, read, in line (bench/overlap.py compares the two).
        self.overlap = True
        self._committing: asyncio.Task[None] | None = None
        # The next bulk batch, claimed while the model embeds this one's last call
        # (`_read_ahead`), and the lease hold on its entries until it is processed.
        self._ahead: asyncio.Task[ReadAhead] | None = None
        self._ahead_held: contextlib.ExitStack | None = None

    def _cache(self, redis: RedisClient) -> EmbeddingCache | None:
        """The shared cache, for embedders that say which revision of the model they run."""
        revision = getattr(self.embedder, "revision", None)
        if not self.settings.cache or revision is None:
            return None
        name = fingerprint(self.model, str(revision), self.backend, self.settings.dtype)
        return EmbeddingCache(redis, self.keys, name, ttl_s=self.settings.cache_ttl_s,
                              max_entries=self.settings.cache_max_entries)

    async def run(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Work until `stop` is set; finish the batch in hand, then deregister."""
        assert self.settings.redis_url, "the worker needs a Redis URL"
        self.stopping = stop
        self.redis = connect(self.settings.redis_url)
        self.blocking = connect(self.settings.redis_url, blocking=True, max_connections=4)
        self.scripts = JobScripts(self.redis, self.keys)
        info = self.embedder.info
        info = dataclasses.replace(info, backend=self.backend)
        self.calls.cache = self._cache(self.redis)
        self.upkeep = Upkeep(self.redis, self.keys, self.settings, self.worker_id, info,
                             self.streams)
        try:
            await self.upkeep.register()
            # Upkeep has its own stop: it must outlive the drain of the last batch.
            upkeep_stop = asyncio.Event()
            upkeep_task = asyncio.create_task(self.upkeep.run(upkeep_stop))
            if ready is not None:
                ready.set()
            try:
                await self._loop(stop)
                await self._hand_back_read_ahead()
                await self._settle()  # the last commit lands before the goodbye
            finally:
                for task in (self._ahead, self._committing):
                    if task is not None:  # cancelled, or failed: not left running
                        await cancel_and_wait(task)
                upkeep_stop.set()
                await cancel_and_wait(upkeep_task)
                await self.upkeep.deregister()
        finally:
            await self.redis.aclose()
            await self.blocking.aclose()

    async def _loop(self, stop: asyncio.Event) -> None:
        await self._drain_own_pending()
        while not stop.is_set():
            honour_cancel()
            try:
                entries = await self._claim()
                if entries:
                    try:
                        await self.process(entries)
                    finally:
                        self._drop_read_ahead_hold()
            except (RedisConnectionError, RedisTimeoutError):
                logger.warning("lost Redis; retrying in 1s", exc_info=True)
                await _wait(stop, 1.0)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Redis lost its data (restarted without persistence, or flushed):
                # make the groups again and carry on.
                logger.warning("consumer groups are gone; creating them again")
                assert self.upkeep is not None
                await self.upkeep.create_groups()
            except Exception:
                # A bug in one batch must not take the worker down: its entries
                # stay pending and are retried, then given up on as poison.
                logger.exception("batch failed")
                await _wait(stop, 1.0)

    async def _drain_own_pending(self) -> None:
        """On start, finish what this consumer name claimed before a restart."""
        assert self.redis is not None
        reply = await self.redis.xreadgroup(GROUP, self.worker_id,
                                            dict.fromkeys(self.streams, "0"), count=1000)
        assert self.upkeep is not None
        entries = await self.upkeep.with_deliveries(_entries(reply))
        if entries:
            logger.info("resuming %d entries left pending by a previous run", len(entries))
            await self.process(entries)

    async def _claim(self) -> list[Entry]:
        """Reclaimed stale entries first, then the fast lane, then the bulk lane."""
        assert self.redis is not None and self.blocking is not None and self.upkeep
        stale, poison = await self.upkeep.reclaim_stale()
        if poison:
            await self.give_up(poison)
        if stale:
            return stale
        fast, bulk = self.streams
        entries = await self._claim_fast()
        if entries:
            return entries  # alone: the bulk lane can wait one short batch
        if self._ahead is not None:
            entries = await self._take_read_ahead()
            if entries:
                return entries
        # COUNT is per stream: one entry of each lane at most, then bulk up to the budget.
        reply = await self.blocking.xreadgroup(GROUP, self.worker_id, {fast: ">", bulk: ">"},
                                               count=1, block=self.settings.block_ms)
        entries = _entries(reply)
        if any(e.stream == fast for e in entries):
            self._fast_served_at = time.monotonic()
        room = (self.settings.batch_max_texts - sum(e.size for e in entries)) \
            // self.settings.chunk_size
        if entries and room > 0:
            reply = await self.redis.xreadgroup(GROUP, self.worker_id, {bulk: ">"}, count=room)
            entries += _entries(reply)
        return entries

    async def _claim_fast(self) -> list[Entry]:
        """Fast-lane entries, one at a time, up to one model call's worth of texts.

        One at a time because an entry may carry up to `fast_lane_max_texts`
        texts: reading a whole batch's count of entries at once is how one
        worker came to hoard the lane while its peers idled. One script reads
        them (`workers.lanes`): one round trip however many it takes.
        """
        assert self.upkeep is not None
        fast = self.streams[0]
        claimed = await self.upkeep.lanes.claim(fast, self.worker_id,
                                                self.settings.call_max_texts)
        if claimed:
            self._fast_served_at = time.monotonic()
        return _entries([(fast, claimed)])

    def _fast_lane_busy(self) -> bool:
        """Whether interactive work came in the last `BUSY_S` (bulk calls are cut finer)."""
        return time.monotonic() - self._fast_served_at < BUSY_S

    async def _serve_fast_lane(self) -> None:
        """Between two model calls of a bulk batch: embed and commit waiting fast-lane work."""
        if self.stopping.is_set():
            return  # draining: claim nothing new
        entries = await self._claim_fast()
        if entries:
            await self.process(entries, interruptible=False)

    async def process(self, entries: list[Entry], interruptible: bool = True) -> None:
        """Embed and commit claimed entries, at most `batch_max_texts` texts a batch.

        Fast-lane entries claimed together with bulk ones go first, on their own:
        sorted in with the bulk texts by length they could land in the last call.
        """
        fast = [e for e in entries if e.stream == self.streams[0]]
        if fast and len(fast) < len(entries):
            await self._process(fast, interruptible=False)
            entries = [e for e in entries if e.stream != self.streams[0]]
        await self._process(entries, interruptible)

    async def _process(self, entries: list[Entry], interruptible: bool) -> None:
        assert self.redis is not None and self.upkeep is not None
        if self.stopping.is_set():  # claimed as the stop came: not started, so handed back
            await self.upkeep.release(entries)
            return
        work, skip = await load_work(self.redis, self.keys, entries)
        if skip:
            await self._ack(skip)
        if not work:
            return
        await self._mark_started({w.entry.job_id for w in work if w.entry.request is None})
        # A redelivered chunk may have killed the worker that held it: alone it goes.
        steps = [[w] for w in work if w.entry.deliveries > 1]
        steps += batches([w for w in work if w.entry.deliveries == 1],
                         self.settings.batch_max_texts)
        between = self._serve_fast_lane if interruptible else None
        behind = self.overlap and work[0].entry.stream == self.streams[1]
        with self.upkeep.leasing(w.entry for w in work):
            for number, group in enumerate(steps):
                if number and self.stopping.is_set():
                    await self.upkeep.release([w.entry for g in steps[number:] for w in g])
                    return
                if behind and number == len(steps) - 1:
                    self._start_read_ahead()
                embed_s = await self._embed(group, between)
                if behind:
                    await self._commit_behind(group, embed_s)
                else:
                    await self._finish(group, embed_s)

    async def _embed(self, group: list[Work], between: BetweenCalls | None) -> float:
        """Fill the group's vectors; the seconds it took."""
        assert self.redis is not None
        started = time.perf_counter()
        if group[0].entry.deliveries > 1:
            await embed_attempted(self.redis, self.keys, self.calls.model, group[0],
                                  self.settings.result_ttl_s)
        else:
            await self.calls.embed(group, between_calls=between)
        return time.perf_counter() - started

    async def _finish(self, group: list[Work], embed_s: float) -> None:
        """Commit an embedded group's chunks, then count the batch."""
        assert self.redis is not None
        max_seq = self.embedder.info.max_seq_length
        await self.commit([chunk_result(w, max_seq, self.backend) for w in group],
                          [w.entry for w in group])
        texts = sum(len(w.texts) for w in group)
        await metrics.record_batch(self.redis, self.keys, self.worker_id, texts,
                                   _tokens(group), embed_s)
        logger.info("embedded %d texts of %d chunks in %.3fs", texts, len(group), embed_s)

    async def _commit_behind(self, group: list[Work], embed_s: float) -> None:
        """Commit `group` in a task of its own while the model goes on with the next one.

        At most one such commit runs: the previous one is awaited first, so
        commits land in order and a failed one is raised here, in the batch
        after it (its entries stay pending, to be reclaimed). The entries stay
        leased until their commit is done, even after their batch has ended.
        """
        await self._settle()
        assert self.upkeep is not None
        held = self.upkeep.hold(w.entry for w in group)

        async def commit() -> None:
            with held:
                await self._finish(group, embed_s)

        self._committing = asyncio.create_task(commit(), name=f"commit {self.worker_id}")

    def _start_read_ahead(self) -> None:
        """Claim the next bulk batch while the model embeds this batch's last group."""
        if self._ahead is None and not self.stopping.is_set():
            self._ahead = asyncio.create_task(self._read_ahead(),
                                              name=f"read-ahead {self.worker_id}")

    async def _read_ahead(self) -> ReadAhead:
        """Up to a batch of bulk entries, without blocking; leased from the moment they
        are read, so they are not taken for stale while they wait for the model."""
        assert self.redis is not None and self.upkeep is not None
        room = self.settings.batch_max_texts // self.settings.chunk_size
        reply = await self.redis.xreadgroup(GROUP, self.worker_id, {self.streams[1]: ">"},
                                            count=room)
        entries = _entries(reply)
        return entries, self.upkeep.hold(entries)

    async def _take_read_ahead(self) -> list[Entry]:
        """The entries read ahead; their hold lasts until the batch is processed."""
        assert self._ahead is not None
        task, self._ahead = self._ahead, None
        entries, self._ahead_held = await task
        return entries

    def _drop_read_ahead_hold(self) -> None:
        held, self._ahead_held = self._ahead_held, None
        if held is not None:
            held.close()

    async def _hand_back_read_ahead(self) -> None:
        """Stopping: entries read ahead and never started go back to the peers at once."""
        if self._ahead is None:
            return
        entries = await self._take_read_ahead()
        try:
            if entries:
                assert self.upkeep is not None
                await self.upkeep.release(entries)
        finally:
            self._drop_read_ahead_hold()

    async def _settle(self) -> None:
        """Wait for the commit in flight, if any; what it raised is raised here."""
        task, self._committing = self._committing, None
        if task is not None:
            await task

    async def give_up(self, entries: list[Entry]) -> None:
        """Commit poison chunks as failed, so their jobs can still finish."""
        assert self.redis is not None
        work, skip = await load_work(self.redis, self.keys, entries)
        if skip:
            await self._ack(skip)
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
        await self.commit(results, [w.entry for w in work])
        await metrics.record_given_up(self.redis, self.keys, sum(len(w.texts) for w in work))

    async def commit(self, results: list[ChunkResult], entries: list[Entry]) -> None:
        """Commit each chunk, then ack every entry once every commit has answered."""
        assert self.redis is not None and self.scripts is not None
        asked = [i for i, entry in enumerate(entries) if entry.request is not None]
        if asked:  # interactive requests: a reply each, no job to commit
            await interactive.reply(self.redis, self.keys, self.keys.texts_counter,
                                    [results[i] for i in asked], [entries[i] for i in asked])
            results = [r for i, r in enumerate(results) if i not in set(asked)]
            entries = [e for i, e in enumerate(entries) if i not in set(asked)]
            if not results:
                return
        # Two round trips, not one pipeline: on a cluster a pipeline's commands
        # for different nodes run in parallel, so an XACK could land before
        # the commit of its chunk on another node, and a crash then would lose it.
        async with self.redis.pipeline(transaction=False) as pipe:
            for result in results:
                await self.scripts.queue_commit(pipe, result, self.settings.result_ttl_s)
            replies = await pipe.execute()
        await self._ack(entries)
        committed = [JobScripts.parse_committed(r) for r in replies]
        written = sum(len(r.vectors) for r, c in zip(results, committed, strict=True)
                      if c.written)
        if written:
            await self.redis.incrby(self.keys.texts_counter, written)
        await self._publish(results, committed)

    async def _publish(self, results: list[ChunkResult], committed: list[Committed]) -> None:
        assert self.redis is not None
        latest: dict[str, Committed] = {}
        for result, outcome in zip(results, committed, strict=True):
            if outcome.written:
                latest[result.job_id] = outcome
        for job_id, outcome in latest.items():
            assert outcome.status is not None  # a written commit reports the status
            data: dict[str, Any] = {"id": job_id, "status": outcome.status.value,
                                    "done": outcome.done, "failed": outcome.failed,
                                    "total": outcome.total}
            event = f"job.{outcome.status.value}" if outcome.finished else "job.progress"
            if outcome.finished:
                logger.info("job %s %s: %d done, %d failed", job_id, outcome.status.value,
                            outcome.done, outcome.failed,
                            extra={"event": event, "job_id": job_id, "done": outcome.done,
                                   "failed": outcome.failed, "worker_id": self.worker_id})
            if not outcome.finished:
                await feed.publish(self.redis, self.keys, event, data,
                                   maxlen=self.settings.feed_maxlen)
                continue
            assert self.scripts is not None
            try:  # once, whoever notices: the janitor announces it if this fails
                record = await announce_created(self.scripts, job_id,
                                                maxlen=self.settings.feed_maxlen)
                # What embedded the job, as the janitor's announcement and the job say.
                data["backend"] = (record.backend or None) if record is not None else None
                await announce(self.scripts, job_id, event, data,
                               maxlen=self.settings.feed_maxlen)
            except RedisError:
                logger.warning("could not announce %s of job %s", event, job_id, exc_info=True)

    async def _ack(self, entries: list[Entry]) -> None:
        assert self.redis is not None
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in _by_stream(entries).items():
                pipe.xack(stream, GROUP, *ids)
            await pipe.execute()

    async def _mark_started(self, job_ids: set[str]) -> None:
        assert self.redis is not None and self.scripts is not None
        ordered = sorted(job_ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ordered:
                await self.scripts.queue_mark_started(pipe, job_id)
            started = await pipe.execute()
        for job_id, changed in zip(ordered, started, strict=True):
            if changed == 1:
                logger.info("job %s running", job_id, extra={
                    "event": "job.running", "job_id": job_id, "worker_id": self.worker_id})


def batches(work: list[Work], max_texts: int) -> list[list[Work]]:
    """Split chunks into model calls of at most `max_texts` texts (a chunk is never split)."""
    groups: list[list[Work]] = []
    size = 0
    for item in work:
        if groups and size + len(item.texts) <= max_texts:
            groups[-1].append(item)
            size += len(item.texts)
        else:
            groups.append([item])
            size = len(item.texts)
    return groups


def _tokens(group: list[Work]) -> int:
    return sum(int(w.tokens.sum()) for w in group if w.tokens is not None)


def _entries(reply: Any) -> list[Entry]:
    entries: list[Entry] = []
    for stream, items in reply or ():
        name = stream.decode() if isinstance(stream, bytes) else stream
        for entry_id, fields in items:
            entry = parse_entry(name, entry_id, fields)
            if entry is not None:
                entries.append(entry)
    return entries


def _by_stream(entries: Any) -> dict[str, list[bytes]]:
    grouped: dict[str, list[bytes]] = defaultdict(list)
    for entry in entries:
        grouped[entry.stream].append(entry.entry_id)
    return grouped


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)

