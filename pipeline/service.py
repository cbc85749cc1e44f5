"""The pipeline as one object: what REST, SSE and the MCP tools all call.

Tenants: every method that reads or changes a job takes the `caller` and
checks it through `job` (the one owner check), so another tenant's job is
`JobNotFound`. The default caller is `TRUSTED`, for in-process users (stdio,
tests, tools); the HTTP face always passes the request's caller.

`Pipeline` owns the Redis clients of a server-side process (one for
commands, one without socket timeout for the fan-out hubs' blocking reads,
and one connection for its inbox reader, so interactive replies never wait
behind the hubs) and the objects that do the work: the `Submitter`
(`pipeline.jobs.submitter`), interactive `Requests` and their `Inbox`
(`pipeline.jobs.inbox`), the per-key `RequestQuota`, the fan-out hubs. It
returns dataclasses; JSON is made by the routes and tools. It never loads a
model: embedding always goes through the queue, so any number of server
replicas and workers can share one Redis.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import AsyncGenerator, Iterable
from contextlib import aclosing
from typing import TYPE_CHECKING

from pipeline import tracing
from pipeline.errors import Unavailable
from pipeline.inputs import Item, JobOptions
from pipeline.jobs import events, index, janitor, search
from pipeline.jobs.backlog import Backlog
from pipeline.jobs.catalog import ModelCatalog, Readiness
from pipeline.jobs.idempotency import IdempotencyKeys, Items
from pipeline.jobs.inbox import Inbox
from pipeline.jobs.interactive import Embeddings, ProgressCallback, Requests
from pipeline.jobs.interactive import is_light as is_light_request
from pipeline.jobs.quantize import VectorView, Views
from pipeline.jobs.record import JobRecord, load_job
from pipeline.jobs.request_quota import RequestQuota
from pipeline.jobs.results import ResultsPage, read_page
from pipeline.jobs.scripts import JobScripts, cancel_job
from pipeline.jobs.submission import JobWriter
from pipeline.jobs.submitter import Submitter, shielded
from pipeline.jobs.tenants import TRUSTED, Caller, OwnerCache, check_visible
from pipeline.keys import Keys
from pipeline.model.info import ModelInfo
from pipeline.store.connections import connect, outage_is_unavailable
from pipeline.store.fanout import Hubs
from pipeline.store.partitions import Partitions
from pipeline.store.stats import StatsSampler

if TYPE_CHECKING:
    from pipeline.settings import Settings

logger = logging.getLogger(__name__)
COMMAND_CONNECTIONS = 16


class Pipeline:
    """Submit, inspect, follow and cancel jobs; embed, rank and search through them.

    Every call maps a lost Redis to `Unavailable` (`redis_outage`): one error for "Redis is down".
    """

    def __init__(self, settings: Settings) -> None:
        if not settings.redis_url:
            raise Unavailable("no Redis URL: set EMBEDSTREAM_REDIS_URL or run `embedstream up`")
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        # Commands share a small pool; blocking reads get their own (per hub or wait).
        self.redis = connect(settings.redis_url, max_connections=COMMAND_CONNECTIONS)
        self.blocking = connect(settings.redis_url, blocking=True)
        self.replies = connect(settings.redis_url, blocking=True, max_connections=1)
        self.server_id = uuid.uuid4().hex
        self.inbox = Inbox(self.redis, self.replies, self.keys.inbox(self.server_id),
                           block_ms=settings.block_ms)
        self.scripts = JobScripts(self.redis, self.keys)
        self.idempotency = IdempotencyKeys(self.redis, self.keys, settings)
        self.views = Views(self.redis, self.keys)
        self.owners = OwnerCache(self.redis, self.keys)
        self.hubs = Hubs(self.redis, self.blocking, block_ms=settings.block_ms,
                         buffer=settings.sse_buffer)
        self.chunk_rows = events.ChunkRows(self.redis, self.keys)
        self.partitions = Partitions(self.redis, self.keys, settings)
        self.stats = StatsSampler(self.redis, self.keys, self.partitions)
        self.backlog = Backlog(self.redis, self.keys, settings, self.partitions)
        self.catalog = ModelCatalog(self.redis, self.keys, settings.model)
        self.submitter = Submitter(self.scripts, self.idempotency, self.backlog, settings)
        self.requests = Requests(self.redis, self.inbox, self.server_id, self.keys, self.views,
                                 self.backlog, settings)
        self.quota = RequestQuota(self.redis, self.keys, settings.key_quota_requests)

    async def run_janitor(self, stop: asyncio.Event) -> None:
        """Sweep the active jobs until `stop` (see `pipeline.jobs.janitor`)."""
        await janitor.run_janitor(self.scripts, self.settings, stop)

    async def close(self) -> None:
        """Stop the fan-out and inbox readers, close the Redis clients."""
        await self.hubs.close()
        await self.inbox.close()
        await self.redis.aclose()
        await self.blocking.aclose()
        await self.replies.aclose()

    @outage_is_unavailable
    async def model(self, options: JobOptions, *, recent: bool = False) -> ModelInfo:
        """The model a job with these options will use (see `pipeline.jobs.catalog`)."""
        return await self.catalog.resolve(options, recent=recent)

    @outage_is_unavailable
    async def writer(self, options: JobOptions, caller: Caller = TRUSTED) -> JobWriter:
        """A JobWriter for a streamed submission (validate options first)."""
        info = await self.model(options)
        return JobWriter(self.redis, self.keys, self.settings, options, info, caller.owner,
                         scripts=self.scripts, layout=await self.partitions.layout(info.name))

    @outage_is_unavailable
    async def submit(
        self, items: Iterable[Item], options: JobOptions, *, caller: Caller = TRUSTED,
        idempotency_key: str | None = None, interactive: bool = False,
    ) -> JobRecord:
        """Create and queue a job from validated items; returns its record."""
        writer = await self.writer(options, caller)
        return await self.commit(writer, items, idempotency_key, interactive=interactive)

    @outage_is_unavailable
    async def commit(self, writer: JobWriter, items: Items = None,
                     idempotency_key: str | None = None, *, interactive: bool = False
                     ) -> JobRecord:
        """Feed `items` to `writer` (if given) and commit (see `pipeline.jobs.submitter`)."""
        with tracing.submitting({"embedstream.job.id": writer.job_id}):
            record = await self.submitter.commit(writer, items, idempotency_key,
                                                 interactive=interactive)
            # A replayed Idempotency-Key answers with the job it made first.
            tracing.annotate({"embedstream.job.id": record.id, "embedstream.texts": record.total})
            return record

    @outage_is_unavailable
    async def job(self, job_id: str, caller: Caller = TRUSTED) -> JobRecord:
        """The record of a job `caller` may see; JobNotFound for anyone else's."""
        record = await load_job(self.redis, self.keys, job_id)
        check_visible(job_id, record.owner, caller)
        return record

    @outage_is_unavailable
    async def list_jobs(self, caller: Caller, *, limit: int = 50, cursor: str | None = None,
                        status: str | None = None) -> index.JobPage:
        """The caller's jobs (every job for an admin), newest first, one page."""
        return await index.list_jobs(self.redis, self.keys, caller, limit=limit, cursor=cursor,
                                     status=status)

    @outage_is_unavailable
    async def results(self, job_id: str, cursor: str | None = None, limit: int = 100,
                      encoding: str = "float", *, caller: Caller = TRUSTED) -> ResultsPage:
        """One page of results in index order, delivered in `encoding`."""
        record = await self.job(job_id, caller)
        view = await self.views.for_job(encoding, record)
        return await read_page(self.redis, self.keys, job_id, cursor, limit, view, record)

    @outage_is_unavailable
    async def inputs(self, job_id: str, cursor: str | None = None, limit: int = 100, *,
                     caller: Caller = TRUSTED) -> search.InputsPage:
        """One page of the job's inputs (text, id, metadata) in index order."""
        record = await self.job(job_id, caller)
        return await search.read_inputs_page(self.redis, self.keys, record, cursor, limit)

    @outage_is_unavailable
    async def view(self, job_id: str, encoding: str, caller: Caller = TRUSTED) -> VectorView:
        """How this job's vectors are delivered in `encoding` (raises for an unknown job)."""
        return await self.views.for_job(encoding, await self.job(job_id, caller))

    @outage_is_unavailable
    async def models(self) -> list[ModelInfo]:
        """The models that live workers serve, by name."""
        return await self.catalog.served()

    @outage_is_unavailable
    async def cancel(self, job_id: str, caller: Caller = TRUSTED) -> JobRecord:
        """Cancel a job; returns its record afterwards."""
        await self.job(job_id, caller)
        record = await cancel_job(self.scripts, self.settings, job_id)
        logger.info("job %s cancel asked: now %s", job_id, record.status.value,
                    extra={"event": "job.cancelled", "job_id": job_id,
                           "status": record.status.value})
        return record

    async def follow(
        self, job_id: str, after: str | None = None, encoding: str | VectorView = "float", *,
        caller: Caller = TRUSTED,
    ) -> AsyncGenerator[events.Event, None]:
        """The job's events after `after`, until its end."""
        record = await self.job(job_id, caller)
        view = (encoding if isinstance(encoding, VectorView)
                else await self.views.for_job(encoding, record))
        stream = tracing.delivering(
            events.follow_job_live(self.redis, self.hubs, self.keys, self.chunk_rows, job_id,
                                   after=after, view=view),
            record.traceparent, {"embedstream.job.id": job_id})
        async with aclosing(stream):
            async for event in stream:
                yield event

    async def follow_feed(
        self, after: str | None = None, replay: int = events.FEED_REPLAY, *,
        caller: Caller = TRUSTED,
    ) -> AsyncGenerator[events.Event, None]:
        """The live feed after `after` (else the last `replay` events), with stats;
        job events of the caller's own jobs only (worker and stats events are shared)."""
        stream = events.follow_feed_live(self.redis, self.hubs, self.keys, self.stats,
                                         after=after, replay=replay,
                                         stats_interval_s=self.settings.stats_interval_s)
        async with aclosing(stream):
            async for event in stream:
                if await self.owners.may_see(event.name, event.data, caller):
                    yield event

    @outage_is_unavailable
    async def ready(self) -> Readiness:
        """Whether Redis answers and how many workers are alive."""
        return await self.catalog.readiness()

    @outage_is_unavailable
    async def embed(
        self, items: list[Item], options: JobOptions, *, caller: Caller = TRUSTED,
        on_progress: ProgressCallback | None = None, timeout_s: float | None = None,
        encoding: str = "float",
    ) -> Embeddings:
        """Embed a few texts through the queue and wait: as one interactive request (no job,
        `pipeline.jobs.interactive`), or as a job when many or `truncate: false`; each call
        holds a slot of the caller's `EMBEDSTREAM_KEY_QUOTA_REQUESTS` while it runs."""
        timeout_s = timeout_s or self.settings.embed_timeout_s
        async with self.quota.held(caller.owner, timeout_s):
            if is_light_request(items, options, self.settings.fast_lane_max_texts):
                info = await self.model(options, recent=True)
                with tracing.submitting({"embedstream.texts": len(items)}):
                    return await self.requests.embed(items, options, info, encoding,
                                                     on_progress, timeout_s, caller.owner)
            return await self._embed_job(items, options, caller, on_progress, timeout_s,
                                         encoding)

    async def _embed_job(
        self, items: list[Item], options: JobOptions, caller: Caller,
        on_progress: ProgressCallback | None, timeout_s: float, encoding: str,
    ) -> Embeddings:
        """Embed texts as a job and wait for its rows; the job is cancelled if the wait ends."""
        submitting = asyncio.ensure_future(
            self.submit(items, options, caller=caller, interactive=True))
        try:
            job_id = (await asyncio.shield(submitting)).id
        except asyncio.CancelledError:  # the caller left mid-submission: finish, then cancel
            await shielded(self._cancel_once_made(submitting, caller))
            raise
        cancel = functools.partial(self.cancel, job_id, caller)
        try:
            view = await self.view(job_id, encoding, caller)
        except BaseException:  # an error, or the caller left: nobody will read the job
            await shielded(cancel())
            raise
        # Closed on purpose: a caller that left stops the job's hub subscription at once.
        async with aclosing(self.follow(job_id, encoding=view, caller=caller)) as followed:
            rows = await events.await_rows(followed, cancel, timeout_s, on_progress)
        return Embeddings.of_job(await self.job(job_id, caller), rows)

    async def _cancel_once_made(self, submitting: asyncio.Future[JobRecord],
                                caller: Caller) -> None:
        """Cancel the job `submitting` makes, if it makes one (a failed one cleans up itself)."""
        try:
            record = await submitting
        except Exception:
            return
        await self.cancel(record.id, caller)

    @outage_is_unavailable
    async def similarity(
        self, query: str, candidates: list[str], options: JobOptions, *,
        caller: Caller = TRUSTED, on_progress: ProgressCallback | None = None,
    ) -> list[search.Match]:
        """Candidates ranked by cosine similarity to the query, best first."""
        items = [Item(query), *(Item(text) for text in candidates)]
        embedded = await self.embed(items, options, caller=caller, on_progress=on_progress)
        matrix = search.vectors_of(embedded.rows)
        return search.rank(matrix[0], matrix[1:], candidates)

    @outage_is_unavailable
    async def search(self, job_id: str, query: str, top_k: int = 10, *,
                     caller: Caller = TRUSTED) -> list[search.SearchHit]:
        """The `top_k` inputs of a finished job nearest to `query`."""
        record = await self.job(job_id, caller)
        embedded = await self.embed([Item(query)], search.query_options(record), caller=caller)
        return await search.search_job(self.redis, self.keys, record,
                                       search.vectors_of(embedded.rows)[0], top_k)
