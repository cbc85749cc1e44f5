"""Following a job's events and the live feed, as resumable event sequences.

Event ids are Redis stream entry ids, so "resume after X" is a plain XREAD
from X: nothing in between is skipped and nothing before it is repeated.
One stored `result` entry yields two events with the same id, `result` (the
chunk's rows, as a JSON list) and `progress`; resuming after that id skips
both, which is right because the stored entry is the unit of delivery.

These generators know nothing of HTTP: the SSE endpoints and the MCP `embed`
tool both consume them. `follow_job_live` and `follow_feed_live` read
through the process's fan-out hubs (`pipeline.store.fanout`), so any number
of followers of one stream share one Redis reader, one stats sampler and one
fetch of each committed chunk (`ChunkRows`). A lost Redis raises
`Unavailable` from them (`redis_outage`), as from every `Pipeline` call.
"""

from __future__ import annotations

import asyncio
import re
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.errors import InvalidCursor, JobNotFound, Unavailable
from pipeline.jobs.interactive import NO_WORKER_IN_TIME, ProgressCallback
from pipeline.jobs.record import load_job
from pipeline.jobs.results import ResultRow, read_chunk_rows
from pipeline.jobs.submitter import shielded
from pipeline.store.connections import redis_outage

if TYPE_CHECKING:
    from pipeline.jobs.quantize import VectorView
    from pipeline.keys import Keys
    from pipeline.store.connections import RedisClient
    from pipeline.store.fanout import Entry, Hubs
    from pipeline.store.stats import StatsSampler

STREAM_ID = re.compile(r"[0-9]{1,20}(?:-[0-9]{1,20})?")
MAX_ID_PART = 2**64 - 1
READ_COUNT = 64
FEED_REPLAY = 100


@dataclass(frozen=True)
class Event:
    """One event: its resume id, its name and its JSON-able data."""

    id: str
    name: str
    data: Any


def check_event_id(value: str | None) -> str:
    """A resume cursor must be a stream id (`<ms>-<seq>`); None means from the start."""
    if value is None or value == "":
        return "0"
    # ASCII digits only and each part within Redis's 64 bits: anything else
    # would pass here and then fail inside XREAD, after the stream opened.
    if not STREAM_ID.fullmatch(value) or any(
            int(part) > MAX_ID_PART for part in value.split("-")):
        raise InvalidCursor(f"malformed event id {value[:40]!r}: expected '<ms>-<seq>' "
                            "as sent in an event's id field")
    return value


async def feed_replay_start(redis: RedisClient, keys: Keys, replay: int) -> str:
    """A cursor just before the newest `replay` feed events ("0" if there are fewer)."""
    newest = await redis.xrevrange(keys.feed, count=replay + 1)
    return newest[-1][0].decode() if len(newest) > replay else "0"


class ChunkRows:
    """Committed chunks' rows, fetched once per process however many followers want them."""

    def __init__(self, redis: RedisClient, keys: Keys, max_entries: int = 256) -> None:
        self.redis = redis
        self.keys = keys
        self.max_entries = max_entries
        self._rows: OrderedDict[tuple[str, int, str], asyncio.Future[list[Any]]] = OrderedDict()

    async def rows(self, job_id: str, chunk: int, chunk_size: int, view: VectorView) -> list[Any]:
        """The chunk's rows as `view` delivers them (a fresh list; the row dicts are shared).

        Keyed by the view's encoding alone: every follower of one job gets the
        same view for an encoding (its model's calibration ranges).
        """
        key = (job_id, chunk, view.encoding)
        future = self._rows.get(key)
        if future is None:
            future = asyncio.ensure_future(read_chunk_rows(
                self.redis, self.keys, job_id, chunk, chunk_size, view))
            self._rows[key] = future
            while len(self._rows) > self.max_entries:
                self._rows.popitem(last=False)
        try:
            return list(await asyncio.shield(future))
        except BaseException:
            if future.done() and self._rows.get(key) is future:
                del self._rows[key]  # a failed fetch is not cached
            raise


async def follow_job_live(
    redis: RedisClient, hubs: Hubs, keys: Keys, chunks: ChunkRows, job_id: str,
    *, after: str | None = None, view: VectorView,
) -> AsyncGenerator[Event, None]:
    """The job's result, progress and end events after `after`, until the end.

    Read through the job's fan-out hub: followers of one job share its reader.
    """
    stream = _job_events(redis, hubs, keys, chunks, job_id, after=after, view=view)
    async with aclosing(stream):
        with redis_outage():
            async for event in stream:
                yield event


async def _job_events(
    redis: RedisClient, hubs: Hubs, keys: Keys, chunks: ChunkRows, job_id: str,
    *, after: str | None, view: VectorView,
) -> AsyncGenerator[Event, None]:
    cursor = check_event_id(after)
    record = await load_job(redis, keys, job_id)
    chunk_size = record.chunk_size
    stream = keys.events(job_id)

    async def ended_quietly(position: str) -> bool:
        # The job may have finished with no `end` reaching the stream after our
        # position (or the client resumed after `end`), or expired or been
        # deleted meanwhile: then the hub ends itself.
        try:
            finished = (await load_job(redis, keys, job_id)).finished
        except JobNotFound:
            return True
        return finished and not await redis.xread({stream: position}, count=1)

    entries = hubs.hub(stream, on_idle=ended_quietly).entries(cursor)
    async with aclosing(entries):
        async for entry in entries:
            kind = entry.fields.get("type")
            if kind == "result":
                rows = await chunks.rows(job_id, int(entry.fields["chunk"]), chunk_size, view)
                yield Event(entry.id, "result", rows)
                yield Event(entry.id, "progress", _progress(entry))
            elif kind == "end":
                try:
                    record = await load_job(redis, keys, job_id)
                except JobNotFound:
                    return  # gone: the stream just ends (a resume then gets 404)
                yield Event(entry.id, "end", record.public())
                return


def _progress(entry: Entry) -> dict[str, int]:
    return {name: int(entry.fields[name]) for name in ("done", "failed", "total")}


async def follow_feed_live(
    redis: RedisClient, hubs: Hubs, keys: Keys, sampler: StatsSampler,
    *, after: str | None = None, stats_interval_s: float = 2.0, replay: int = FEED_REPLAY,
) -> AsyncGenerator[Event, None]:
    """Feed events after `after` (else the last `replay` ones), with `stats` every interval.

    A dashboard that connects without a cursor is shown the recent past (the
    jobs it would otherwise never see) before live events. Read through the
    process's feed hub and its one stats sampler.
    """
    stream = _feed_events(redis, hubs, keys, sampler, after=after,
                          stats_interval_s=stats_interval_s, replay=replay)
    async with aclosing(stream):
        with redis_outage():
            async for event in stream:
                yield event


async def _feed_events(
    redis: RedisClient, hubs: Hubs, keys: Keys, sampler: StatsSampler,
    *, after: str | None, stats_interval_s: float, replay: int,
) -> AsyncGenerator[Event, None]:
    cursor = check_event_id(after) if after else await feed_replay_start(redis, keys, replay)
    hub = hubs.hub(keys.feed, tick=(stats_interval_s, sampler.sample))
    await hub.ready()
    if hub.latest_tick is not None:
        yield Event(cursor, "stats", hub.latest_tick.fields["data"])
    entries = hub.entries(cursor)
    async with aclosing(entries):
        async for entry in entries:
            if entry.synthetic:
                yield Event(cursor, "stats", entry.fields["data"])
                continue
            cursor = entry.id
            yield Event(cursor, entry.fields["type"], orjson.loads(entry.fields["data"]))


async def collect_rows(
    events: AsyncIterator[Event], on_progress: ProgressCallback | None
) -> list[ResultRow]:
    """A followed job's result rows in index order, once its `end` arrives; progress told."""
    rows: list[ResultRow] = []
    async for event in events:
        if event.name == "result":
            rows.extend(event.data)
        elif event.name == "progress" and on_progress is not None:
            await on_progress(event.data["done"] + event.data["failed"], event.data["total"])
    rows.sort(key=lambda row: row["index"])
    return rows


async def await_rows(
    events: AsyncIterator[Event], cancel: Callable[[], Awaitable[object]], timeout_s: float,
    on_progress: ProgressCallback | None,
) -> list[ResultRow]:
    """A followed job's rows within `timeout_s`; the job is cancelled if the wait ends early.

    A caller that went away (an MCP client cancelled, an HTTP client hung up)
    needs its texts embedded no more: the cancel runs to its end, shielded.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await collect_rows(events, on_progress)
    except asyncio.CancelledError:
        await shielded(cancel())
        raise
    except TimeoutError:
        await cancel()
        raise Unavailable(NO_WORKER_IN_TIME) from None
