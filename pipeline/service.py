"""The pipeline as one object: what REST, SSE and the MCP tools all call.

Tenants: every method that reads or changes a job takes the `caller` and
checks it through `owned` (the one owner check), so another tenant's job is
`JobNotFound`. The default caller is `TRUSTED`, for in-process users (stdio,
tests, tools); the HTTP face always passes the request's caller.

`Pipeline` owns the Redis clients of a server-side process (one for
commands, one without socket timeout for blocking reads) and turns requests
into jobs, results and event sequences. It never loads a model: embedding
always goes through the queue, so any number of server replicas and workers
can share one Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sized,
)
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import anyio
import numpy as np
from redis.exceptions import RedisError

from pipeline.errors import (
    Conflict,
    IdempotencyKeyReused,
    InvalidInput,
    JobNotFinished,
    JobNotFound,
    PipelineError,
    Unavailable,
)
from pipeline.inputs import Item, JobOptions
from pipeline.jobs import events, interactive, janitor, results, submission
from pipeline.jobs import index as job_index
from pipeline.jobs.backlog import Backlog
from pipeline.jobs.quantize import VectorView, Views
from pipeline.jobs.record import JobRecord, JobStatus, load_job
from pipeline.jobs.scripts import JobScripts, announce, cancel_job
from pipeline.jobs.tenants import TRUSTED, Caller, OwnerCache, check_visible, visible
from pipeline.keys import Keys
from pipeline.model.info import ModelInfo, find_served, resolve_model
from pipeline.store.connections import connect, redis_outage
from pipeline.store.fanout import Hubs
from pipeline.store.stats import StatsSampler, live_workers, served_models
from pipeline.tasks import cancel_and_wait, honour_cancel

if TYPE_CHECKING:
    from pipeline.settings import Settings

logger = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")
ProgressCallback = Callable[[int, int], Awaitable[None]]
IDEMPOTENCY_TTL_S = 24 * 3600
COMMAND_CONNECTIONS = 16
SERVED_CACHE_S = 1.0


def _outage_is_unavailable(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Run a Pipeline call inside `redis_outage()`: a lost Redis raises Unavailable."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        with redis_outage():
            return await fn(*args, **kwargs)

    return call


async def _events_outage_is_unavailable(
    sequence: AsyncIterator[events.Event],
) -> AsyncIterator[events.Event]:
    """An event sequence whose lost Redis raises Unavailable (closed with its consumer)."""
    try:
        with redis_outage():
            async for event in sequence:
                yield event
    finally:
        if isinstance(sequence, AsyncGenerator):
            await sequence.aclose()


async def _feed(
    writer: submission.JobWriter, items: Iterable[Item] | AsyncIterable[Item] | None
) -> None:
    if isinstance(items, AsyncIterable):
        async for item in items:
            await writer.add(item)
    elif items is not None:
        await writer.add_many(items)


async def _shielded(cleanup: Awaitable[Any]) -> None:
    """Run `cleanup` to its end even while the caller is being cancelled.

    anyio cancel scopes (the MCP SDK's, Starlette's on a client hang-up) cancel
    every await inside them, cleanup included: a shielded scope stops anyio's,
    and the task behind `asyncio.shield` outlives a plain asyncio cancellation.
    """
    task = asyncio.ensure_future(cleanup)
    with anyio.CancelScope(shield=True):
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
    if task.exception() is not None:  # cleanup must not hide why it ran
        logger.warning("cleanup failed", exc_info=task.exception())


class Pipeline:
    """Submit, inspect, follow and cancel jobs; embed, rank and search through them.

    Every call maps Redis connection and timeout errors to `Unavailable`
    (`redis_outage`), so callers see one error for "Redis is down".
    """

    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise Unavailable("no Redis URL: set EMBEDSTREAM_REDIS_URL or run `embedstream up`")
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        # Commands share a small pool (they wait for a free connection); blocking
        # reads get their own, one per fan-out hub or interactive wait.
        self.redis = connect(settings.redis_url, max_connections=COMMAND_CONNECTIONS)
        self.scripts = JobScripts(self.redis, self.keys)
        self.idempotency = submission.IdempotencyKeys(self.redis, self.keys, settings,
                                                      IDEMPOTENCY_TTL_S)
        self.blocking = connect(settings.redis_url, blocking=True)
        self.views = Views(self.redis, self.keys)
        self.owners = OwnerCache(self.redis, self.keys)
        self.hubs = Hubs(self.redis, self.blocking, block_ms=settings.block_ms,
                         buffer=settings.sse_buffer)
        self.chunk_rows = events.ChunkRows(self.redis, self.keys)
        self.stats = StatsSampler(self.redis, self.keys)
        self.backlog = Backlog(self.redis, self.keys, settings)
        self.requests = interactive.Sender(self.redis, self.backlog.limit(interactive=True),
                                           settings.chunk_size)
        self._served: tuple[float, list[ModelInfo]] = (-SERVED_CACHE_S, [])

    async def run_janitor(self, stop: asyncio.Event) -> None:
        """Sweep the active jobs every `janitor_interval_s` until `stop` (see janitor).

        Stopped between sweeps, never cancelled inside one: a Redis command
        cancelled mid-reply can leave its connection so that closing the client hangs.
        """
        while not stop.is_set():
            honour_cancel()
            try:
                await janitor.sweep_jobs(self.scripts, self.settings)
            except RedisError:
                logger.warning("job janitor failed; retrying", exc_info=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.janitor_interval_s)

    async def close(self) -> None:
        """Stop the fan-out readers, close both Redis clients."""
        await self.hubs.close()
        await self.redis.aclose()
        await self.blocking.aclose()

    @_outage_is_unavailable
    async def model(self, options: JobOptions, *, recent: bool = False) -> ModelInfo:
        """The model a job with these options will use; raises for unknown models.

        `recent` (interactive requests) takes a model seen served in the last
        `SERVED_CACHE_S` from memory: a request then costs two Redis round
        trips (queue and reply), not five. A model not seen there is looked up
        afresh, so a worker that just started is found at once; one that just
        died may still be taken for live that second longer (its request waits
        for a peer, as it would have had the worker died a moment later).
        """
        seen_at, served = self._served
        info = None
        if recent and time.monotonic() - seen_at < SERVED_CACHE_S:
            info = find_served(served, self.settings.model, options.model)
        if info is None:
            info = await resolve_model(self.redis, self.keys.models, self.settings.model,
                                       options.model, await self.models())
        submission.check_model_options(options, info)
        return info

    @_outage_is_unavailable
    async def writer(
        self, options: JobOptions, caller: Caller = TRUSTED
    ) -> submission.JobWriter:
        """A JobWriter for a streamed submission (validate options first)."""
        info = await self.model(options)
        return submission.JobWriter(self.redis, self.keys, self.settings, options, info,
                                    caller.owner, scripts=self.scripts)

    @_outage_is_unavailable
    async def submit(
        self, items: Iterable[Item], options: JobOptions, *,
        caller: Caller = TRUSTED, idempotency_key: str | None = None,
        interactive: bool = False,
    ) -> dict[str, Any]:
        """Create and queue a job from validated items; returns the public job."""
        writer = await self.writer(options, caller)
        return await self.commit(writer, items, idempotency_key, interactive=interactive)

    @_outage_is_unavailable
    async def commit(
        self, writer: submission.JobWriter,
        items: Iterable[Item] | AsyncIterable[Item] | None = None,
        idempotency_key: str | None = None, *, interactive: bool = False,
    ) -> dict[str, Any]:
        """Feed `items` to `writer` (if given) and commit; honours an idempotency key.

        A key names the first request's job. A retry of the same request (same
        options and inputs, compared by digest) gets that job; another request
        under the same key is refused with 422 rather than silently answered
        with a job that is not its own. The key is leased to this upload while
        it runs and bound to the job once the job is queued (see
        `pipeline.jobs.submission`); cleanup after a failure or a cancellation runs
        to its end, shielded from the cancellation.

        Backpressure (`Backlog`) is checked before anything is written and
        again once the inputs are counted, before the job is committed: a
        refused submission leaves nothing queued.
        """
        key, scope = idempotency_key, writer.owner
        if key:
            existing = await submission.take_key(self.idempotency, self.redis, self.keys,
                                                 scope, key, writer.job_id)
            if existing is not None:
                return await self._replay(writer, items, key, existing)
        known = len(items) if isinstance(items, Sized) else 0
        try:
            async with self._leased(scope, key, writer.job_id):
                await self.backlog.check(writer.model.name, known, interactive=interactive)
                await _feed(writer, items)
                if writer.total > known:
                    await self.backlog.check(writer.model.name, writer.total,
                                             interactive=interactive)
                # Listed before it becomes visible: the list is in another hash slot.
                await job_index.add(self.redis, self.keys, writer.owner, writer.job_id,
                                    max_age_s=2 * self.settings.result_ttl_s)
                record = await writer.commit()
            if key:
                await self.idempotency.bind(scope, key, writer.job_id,
                                            writer.digest.hexdigest())
                await self.scripts.step("bound")
        except BaseException:
            await _shielded(self._abandon(writer, key))
            raise
        await self._announce_created(record)
        logger.info("job %s created: %s texts, model %s", record.id, record.total,
                    record.model, extra={"event": "job.created", "job_id": record.id,
                                         "total": record.total})
        return record.public()

    async def _replay(
        self, writer: submission.JobWriter,
        items: Iterable[Item] | AsyncIterable[Item] | None,
        key: str, existing: submission.IdempotencyClaim,
    ) -> dict[str, Any]:
        """The job a reused key names, once this request is known to be the same one."""
        if existing.digest is not None:
            digest = submission.RequestDigest(writer.options)
            if isinstance(items, AsyncIterable):
                async for item in items:
                    digest.update(item)
            else:
                for item in items or ():
                    digest.update(item)
            if digest.hexdigest() != existing.digest:
                await writer.abort()
                raise IdempotencyKeyReused(
                    f"Idempotency-Key {key[:80]!r} was first used for another request (other "
                    f"inputs or options; its job is {existing.job_id}); send a new key for a "
                    "new request")
        await writer.abort()
        try:
            return await self.job(existing.job_id, Caller(writer.owner))
        except JobNotFound:
            raise Conflict("a submission with this Idempotency-Key is still being written; "
                           "retry in a moment to get its job") from None

    @contextlib.asynccontextmanager
    async def _leased(self, scope: str, key: str | None, job_id: str) -> AsyncIterator[None]:
        """Renew the upload's lease on its Idempotency-Key while the block runs."""
        if not key:
            yield
            return

        async def renew() -> None:
            while True:
                await asyncio.sleep(self.settings.idempotency_lease_s / 3)
                with contextlib.suppress(RedisError):
                    if not await self.idempotency.renew(scope, key, job_id):
                        logger.warning("job %s lost its Idempotency-Key lease", job_id)
                        return

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            await cancel_and_wait(task)

    async def _abandon(self, writer: submission.JobWriter, key: str | None) -> None:
        """After a failed submission: drop its staged keys and free its key, if never seen."""
        try:
            # A job that became visible runs on, and its key's lapsing lease names it.
            if await writer.abort():
                await job_index.remove(self.redis, self.keys, writer.owner, writer.job_id)
                if key:
                    await self.idempotency.release(writer.owner, key, writer.job_id)
        except RedisError:
            logger.warning("could not clean up job %s; its staged keys expire by themselves",
                           writer.job_id, exc_info=True)

    async def _announce_created(self, record: JobRecord) -> None:
        try:
            await announce(self.scripts, record.id, "job.created", record.public(),
                                maxlen=self.settings.feed_maxlen)
            await self.scripts.step("announced")
        except RedisError:  # the janitor announces it
            logger.warning("could not announce job %s", record.id, exc_info=True)

    @_outage_is_unavailable
    async def owned(self, job_id: str, caller: Caller) -> JobRecord:
        """The record of a job `caller` may see; JobNotFound for anyone else's."""
        record = await load_job(self.redis, self.keys, job_id)
        check_visible(job_id, record.owner, caller)
        return record

    @_outage_is_unavailable
    async def job(self, job_id: str, caller: Caller = TRUSTED) -> dict[str, Any]:
        """A job's public status."""
        return (await self.owned(job_id, caller)).public()

    @_outage_is_unavailable
    async def list_jobs(
        self, caller: Caller, *, limit: int = 50, cursor: str | None = None,
        status: str | None = None,
    ) -> dict[str, Any]:
        """The caller's jobs (every job for an admin), newest first, one page."""
        return await job_index.list_jobs(self.redis, self.keys, caller, limit=limit,
                                         cursor=cursor, status=status)

    @_outage_is_unavailable
    async def record(self, job_id: str) -> JobRecord:
        """A job's whole record (counters such as `tokens` included)."""
        return await load_job(self.redis, self.keys, job_id)

    @_outage_is_unavailable
    async def results(
        self, job_id: str, cursor: str | None = None, limit: int = 100,
        encoding: str = "float", *, caller: Caller = TRUSTED,
    ) -> dict[str, Any]:
        """One page of results in index order, delivered in `encoding`."""
        record = await self.owned(job_id, caller)
        view = await self.views.for_job(encoding, record)
        return await results.read_page(self.redis, self.keys, job_id, cursor, limit, view,
                                       record)

    @_outage_is_unavailable
    async def view(self, job_id: str, encoding: str) -> VectorView:
        """How this job's vectors are delivered in `encoding` (raises for an unknown job)."""
        return await self.views.for_job(encoding, await self.record(job_id))

    @_outage_is_unavailable
    async def models(self) -> list[ModelInfo]:
        """The models that live workers serve, by name."""
        served = await served_models(self.redis, self.keys)
        self._served = (time.monotonic(), served)
        return served

    @_outage_is_unavailable
    async def cancel(self, job_id: str, caller: Caller = TRUSTED) -> dict[str, Any]:
        """Cancel a job; returns its status afterwards."""
        await self.owned(job_id, caller)
        job = await cancel_job(self.scripts, self.settings, job_id)
        logger.info("job %s cancel asked: now %s", job_id, job["status"],
                    extra={"event": "job.cancelled", "job_id": job_id, "status": job["status"]})
        return job

    async def follow(
        self, job_id: str, after: str | None = None, encoding: str | VectorView = "float", *,
        caller: Caller = TRUSTED,
    ) -> AsyncGenerator[events.Event, None]:
        """The job's events after `after`, until its end."""
        record = await self.owned(job_id, caller)
        view = (encoding if isinstance(encoding, VectorView)
                else await self.views.for_job(encoding, record))
        stream = events.follow_job_live(self.redis, self.hubs, self.keys, self.chunk_rows,
                                        job_id, after=after, view=view)
        async with aclosing(stream):
            async for event in _events_outage_is_unavailable(stream):
                yield event

    async def follow_feed(
        self, after: str | None = None, replay: int = events.FEED_REPLAY, *,
        caller: Caller = TRUSTED,
    ) -> AsyncGenerator[events.Event, None]:
        """The live feed after `after` (else the last `replay` events), with stats.

        A caller is shown the job events of its own jobs only; worker and
        stats events are shared.
        """
        stream = events.follow_feed_live(self.redis, self.hubs, self.keys, self.stats,
                                         after=after, replay=replay,
                                         stats_interval_s=self.settings.stats_interval_s)
        async with aclosing(stream):
            async for event in _events_outage_is_unavailable(stream):
                if await self.may_see_event(event, caller):
                    yield event

    async def may_see_event(self, event: events.Event, caller: Caller) -> bool:
        """Whether a feed event is for `caller`'s eyes (job events: its own jobs only)."""
        if caller.admin or not event.name.startswith("job."):
            return True
        job_id = event.data.get("id") if isinstance(event.data, dict) else None
        return isinstance(job_id, str) and visible(await self.owners.owner(job_id), caller)

    @_outage_is_unavailable
    async def ready(self) -> dict[str, Any]:
        """Whether Redis answers and at least one worker is alive."""
        await self.redis.ping()
        workers = await live_workers(self.redis, self.keys)
        return {"redis": True, "workers": len(workers)}

    @_outage_is_unavailable
    async def embed(
        self, items: list[Item], options: JobOptions, *, caller: Caller = TRUSTED,
        on_progress: ProgressCallback | None = None, timeout_s: float | None = None,
        encoding: str = "float",
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Embed a few texts through the queue and wait: (job, rows in index order).

        At most `fast_lane_max_texts` texts go as one interactive request (no
        job: `pipeline.jobs.interactive`); more, or `truncate: false`, as a job.
        The job dict carries `tokens` either way.
        """
        timeout_s = timeout_s or self.settings.embed_timeout_s
        if interactive.is_light(items, options, self.settings.fast_lane_max_texts):
            return await self._request(items, options, encoding, on_progress, timeout_s)
        job = await self.submit(items, options, caller=caller, interactive=True)
        rows: list[dict[str, Any]] = []
        try:
            view = await self.view(job["id"], encoding)
        except PipelineError:
            await self.cancel(job["id"], caller)
            raise
        try:
            async with asyncio.timeout(timeout_s):
                async for event in self.follow(job["id"], encoding=view, caller=caller):
                    if event.name == "result":
                        rows.extend(event.data)
                    elif event.name == "progress" and on_progress is not None:
                        await on_progress(event.data["done"] + event.data["failed"],
                                          event.data["total"])
                    elif event.name == "end":
                        job = event.data
        except asyncio.CancelledError:
            # The caller went away (an MCP client cancelled, an HTTP client
            # hung up): its texts need not be embedded any more.
            await _shielded(self.cancel(job["id"], caller))
            raise
        except TimeoutError:
            await self.cancel(job["id"], caller)
            raise Unavailable("no worker finished the embedding in time; is a worker "
                              "running for this model? (GET /readyz tells)") from None
        rows.sort(key=lambda row: row["index"])
        record = await self.record(job["id"])
        return {**job, "tokens": record.tokens}, rows

    async def _request(
        self, items: list[Item], options: JobOptions, encoding: str,
        on_progress: ProgressCallback | None, timeout_s: float,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        info = await self.model(options, recent=True)
        sent = interactive.request_options(options, info)
        view = await self.views.for_shape(encoding, **interactive.view_record(sent))
        request_id = await self.requests.send(self.keys.queue(info.name, "fast"), items, sent)
        if isinstance(request_id, int):  # the fast lane's backlog is full: nothing queued
            await self.backlog.refuse(info.name, request_id, len(items), interactive=True)
        reply = await interactive.await_reply(self.blocking, self.keys, request_id, timeout_s)
        if reply is None:
            raise Unavailable("no worker finished the embedding in time; is a worker "
                              "running for this model? (GET /readyz tells)")
        rows = results.render_rows(0, reply.vectors, reply.meta, view)
        if on_progress is not None:
            await on_progress(len(rows), len(rows))
        return interactive.request_job(request_id, sent, rows, reply), rows

    @_outage_is_unavailable
    async def similarity(
        self, query: str, candidates: list[str], options: JobOptions, *,
        caller: Caller = TRUSTED,
        on_progress: ProgressCallback | None = None,
    ) -> list[dict[str, Any]]:
        """Candidates ranked by cosine similarity to the query, best first."""
        items = [Item(query), *(Item(text) for text in candidates)]
        _, rows = await self.embed(items, options, caller=caller, on_progress=on_progress)
        matrix = _matrix(rows)
        scores = _cosine(matrix[1:], matrix[0])
        order = np.argsort(-scores, kind="stable")
        return [{"text": candidates[i], "index": int(i), "score": float(scores[i])}
                for i in order]

    @_outage_is_unavailable
    async def search(
        self, job_id: str, query: str, top_k: int = 10, *, caller: Caller = TRUSTED
    ) -> list[dict[str, Any]]:
        """The `top_k` inputs of a finished job nearest to `query`."""
        record = await self.owned(job_id, caller)
        if record.status is not JobStatus.COMPLETED:
            raise JobNotFinished(f"job {job_id} is {record.status.value}; search_job needs a "
                                 "completed job (poll its status first)")
        options = JobOptions(dimensions=record.dimensions, model=record.model)
        _, rows = await self.embed([Item(query)], options, caller=caller)
        hits = await results.nearest(self.redis, self.keys, record, _matrix(rows)[0], top_k)
        texts = await results.read_texts(self.redis, self.keys, job_id,
                                         [index for index, _ in hits], record.chunk_size)
        return [{"index": index, "score": score, **texts.get(index, {})}
                for index, score in hits]


def _matrix(rows: list[dict[str, Any]]) -> np.ndarray[Any, np.dtype[np.float32]]:
    failed = [row["index"] for row in rows if row.get("embedding") is None]
    if failed:
        raise InvalidInput(f"inputs {failed} could not be embedded: {rows[failed[0]]['error']}")
    return np.vstack([np.asarray(row["embedding"], dtype=np.float32) for row in rows])


def _cosine(
    matrix: np.ndarray[Any, np.dtype[np.float32]], vector: np.ndarray[Any, np.dtype[np.float32]]
) -> np.ndarray[Any, np.dtype[np.float32]]:
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(vector)
    scores: np.ndarray[Any, np.dtype[np.float32]] = (matrix @ vector) / np.maximum(norms, 1e-12)
    return scores

