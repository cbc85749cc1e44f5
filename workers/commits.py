"""Committing embedded chunks: the commit scripts, then the acks, then the feed.

- Each chunk's commit script is sent in one pipeline, followed, where the
  job's node has a replica, by a WAIT for it (`pipeline.store.replicas`);
  once all have answered, a second pipeline acks every entry whose commit
  a replica has (the others are delivered again). Two round trips, not one: on
  a cluster a pipeline's commands for different nodes run in parallel, so an
  XACK could land before the commit of its chunk on another node, and a
  crash then would lose it. A crash between the two leaves chunks committed
  but not acked: on redelivery their done marker is set, so they are only
  acked.
- An interactive request gets a reply instead of a commit (`workers.replies`).
- Commit behind: a group's commit (or its replies) may run in a task of its
  own while the worker claims and embeds the next group (`finish_behind`).
  At most one runs: the previous one is awaited first, so commits land in
  order and a failed one is raised in the group after it (its entries stay
  pending, to be reclaimed). The entries stay leased until their commit is
  done.
- Announcing: a written commit publishes the job's progress on the feed; the
  one that finishes a job announces its end once, whoever notices first, and
  if that fails the janitor announces it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from pipeline import GROUP, cancel_and_wait, tracing
from pipeline.jobs import TERMINAL_STATUSES, Committed, JobScripts, announce, announce_created
from pipeline.store import Replicas, feed, metrics
from workers import replies
from workers.batch import Loaded, chunk_result, load_work

if TYPE_CHECKING:
    from pipeline import Keys, Settings
    from pipeline.jobs import ChunkResult
    from pipeline.store import RedisClient
    from workers.upkeep import Upkeep
    from workers.work import Entry, Work

logger = logging.getLogger(__name__)


class Commits:
    """Commits, acks and announcements of one worker's embedded chunks."""

    def __init__(self, redis: RedisClient, keys: Keys, settings: Settings, worker_id: str,
                 upkeep: Upkeep, *, max_seq_length: int, backend: str) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.worker_id = worker_id
        self.upkeep = upkeep
        self.scripts = JobScripts(redis, keys)
        self.replicas = Replicas(redis, keys, settings)
        self.max_seq_length = max_seq_length
        self.backend = backend
        self._behind: asyncio.Task[None] | None = None

    async def load(self, entries: list[Entry]) -> list[Work]:
        """The work of claimed entries (`load_work`, then `sort_out`)."""
        return await self.sort_out(await load_work(self.redis, self.keys, entries))

    async def prepare(self, entries: list[Entry]) -> Loaded:
        """Read claimed entries' work and mark their queued jobs running: no write but
        the status, so the read-ahead does it while the model embeds the batch before."""
        loaded = await load_work(self.redis, self.keys, entries)
        await self.mark_started({w.entry.job_id for w in loaded.work
                                 if w.entry.request is None})
        return loaded

    async def recheck(self, loaded: Loaded) -> Loaded:
        """Work loaded ahead whose job has ended since (cancelled, say) is only acked,
        not embedded: one short round trip, of the jobs' statuses alone."""
        jobs = sorted({w.entry.job_id for w in loaded.work if w.entry.request is None})
        if not jobs:
            return loaded
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in jobs:
                pipe.hget(self.keys.job(job_id), "status")
            statuses = await pipe.execute()
        ended = {job_id for job_id, status in zip(jobs, statuses, strict=True)
                 if status is None or status.decode() in TERMINAL_STATUSES}
        if ended:
            loaded.skip += [w.entry for w in loaded.work if w.entry.job_id in ended]
            loaded.work = [w for w in loaded.work if w.entry.job_id not in ended]
        return loaded

    async def sort_out(self, loaded: Loaded) -> list[Work]:
        """The work loaded: entries with nothing to do are acked, and chunks of visible
        jobs whose inputs are gone are committed as failed, so their jobs end. In line,
        never ahead: a commit must not run beside the commit behind."""
        if loaded.lost:
            await self.commit([r for _, r in loaded.lost], [e for e, _ in loaded.lost])
        if loaded.skip:
            await self.ack(await self._replicated(loaded.skip))
        return loaded.work

    async def _replicated(self, entries: list[Entry]) -> list[Entry]:
        """The entries whose jobs' writes are on a replica: a job found finished may have
        been finished by a commit no replica confirmed (`pipeline.store.replicas`)."""
        job_keys = {self.keys.job(entry.job_id) for entry in entries}
        kept = await self.replicas.settle(job_keys,
                                          give_up_s=self.settings.wait_timeout_ms / 1000)
        return [entry for entry in entries
                if self.replicas.node_of(self.keys.job(entry.job_id)) in kept]

    @tracing.traced("commit")
    async def finish(self, group: list[Work], embed_s: float) -> None:
        """Commit an embedded group's chunks, then count the batch."""
        await self.commit([chunk_result(w, self.max_seq_length, self.backend) for w in group],
                          [w.entry for w in group])
        texts = sum(len(w.texts) for w in group)
        await metrics.record_batch(self.redis, self.keys, self.worker_id, texts,
                                   _tokens(group), embed_s)
        logger.info("embedded %d texts of %d chunks in %.3fs", texts, len(group), embed_s)

    async def finish_behind(self, group: list[Work], embed_s: float) -> None:
        """`finish` in a task of its own, after the one before it, while the model goes on."""
        await self.settle()
        held = self.upkeep.hold(w.entry for w in group)

        async def commit() -> None:
            """`finish` the group, then end the hold on its entries."""
            with held:
                await self.finish(group, embed_s)

        self._behind = asyncio.create_task(commit(), name=f"commit {self.worker_id}")

    async def settle(self) -> None:
        """Wait for the commit in flight, if any; what it raised is raised here."""
        task, self._behind = self._behind, None
        if task is not None:
            await task

    async def cancel(self) -> None:
        """Stop a commit still in flight (the worker is leaving on an error or a cancel)."""
        if self._behind is not None:
            await cancel_and_wait(self._behind)

    async def commit(self, results: list[ChunkResult], entries: list[Entry]) -> None:
        """Commit each chunk, then ack every entry once every commit has answered."""
        asked = [i for i, entry in enumerate(entries) if entry.request is not None]
        if asked:  # interactive requests: a reply each, no job to commit
            await replies.reply(self.redis, self.keys, self.keys.texts_counter,
                                [results[i] for i in asked], [entries[i] for i in asked])
            results = [r for i, r in enumerate(results) if i not in set(asked)]
            entries = [e for i, e in enumerate(entries) if i not in set(asked)]
            if not results:
                return
        async with self.redis.pipeline(transaction=False) as pipe:
            for result in results:
                await self.scripts.queue_commit(pipe, result, self.settings.result_ttl_s)
            job_keys = [self.keys.job(result.job_id) for result in results]
            waits = await self.replicas.queue_waits(pipe, job_keys)
            answers = await pipe.execute()
        if waits:  # only the entries whose commit a replica has
            kept = self.replicas.confirmed(waits, answers)
            unsure = [key for key in job_keys if self.replicas.node_of(key) not in kept]
            if unsure:
                kept |= await self.replicas.settle(
                    unsure, give_up_s=self.settings.wait_timeout_ms / 1000)
            entries = [entry for entry in entries
                       if self.replicas.node_of(self.keys.job(entry.job_id)) in kept]
        await self.ack(entries)
        committed = [JobScripts.parse_committed(a) for a in answers[:len(results)]]
        written = sum(len(r.vectors) for r, c in zip(results, committed, strict=True)
                      if c.written)
        if written:
            await self.redis.incrby(self.keys.texts_counter, written)
        await self._publish(results, committed)

    async def _publish(self, results: list[ChunkResult], committed: list[Committed]) -> None:
        latest: dict[str, Committed] = {}
        for result, outcome in zip(results, committed, strict=True):
            if outcome.written:
                latest[result.job_id] = outcome
        for job_id, outcome in latest.items():
            assert outcome.status is not None  # a written commit reports the status
            data: dict[str, object] = {"id": job_id, "status": outcome.status.value,
                                       "done": outcome.done, "failed": outcome.failed,
                                       "total": outcome.total}
            if outcome.finished:
                await self._announce_end(job_id, f"job.{outcome.status.value}", outcome, data)
            else:
                await feed.publish(self.redis, self.keys, "job.progress", data,
                                   maxlen=self.settings.feed_maxlen)

    async def _announce_end(self, job_id: str, event: str, outcome: Committed,
                            data: dict[str, object]) -> None:
        logger.info("job %s %s: %d done, %d failed", job_id, event.removeprefix("job."),
                    outcome.done, outcome.failed,
                    extra={"event": event, "job_id": job_id, "done": outcome.done,
                           "failed": outcome.failed, "worker_id": self.worker_id})
        try:  # once, whoever notices: the janitor announces it if this fails
            record = await announce_created(self.scripts, job_id,
                                            maxlen=self.settings.feed_maxlen)
            # What embedded the job, as the janitor's announcement and the job say.
            data["backend"] = (record.backend or None) if record is not None else None
            await announce(self.scripts, job_id, event, data, maxlen=self.settings.feed_maxlen)
        except RedisError:
            logger.warning("could not announce %s of job %s", event, job_id, exc_info=True)

    async def ack(self, entries: list[Entry]) -> None:
        """XACK every entry, each lane's in one command."""
        if not entries:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for stream, ids in _by_stream(entries).items():
                pipe.xack(stream, GROUP, *ids)
            await pipe.execute()

    async def mark_started(self, job_ids: set[str]) -> None:
        """Mark queued jobs running, and log those this call moved."""
        if not job_ids:
            return
        ordered = sorted(job_ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ordered:
                await self.scripts.queue_mark_started(pipe, job_id)
            started = await pipe.execute()
        for job_id, changed in zip(ordered, started, strict=True):
            if changed == 1:
                logger.info("job %s running", job_id, extra={
                    "event": "job.running", "job_id": job_id, "worker_id": self.worker_id})


def _tokens(group: list[Work]) -> int:
    return sum(int(w.tokens.sum()) for w in group if w.tokens is not None)


def _by_stream(entries: Iterable[Entry]) -> dict[str, list[bytes]]:
    grouped: dict[str, list[bytes]] = defaultdict(list)
    for entry in entries:
        grouped[entry.stream].append(entry.entry_id)
    return grouped
