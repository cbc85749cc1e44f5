"""The submitter: commits a written job, abandons a failed one, announces a created one.

`Submitter.commit` runs a submission's steps in order (see
`pipeline.jobs.submission` for what each leaves behind if the process dies):
the Idempotency-Key is taken (or names the job to replay) and leased while
the inputs stream in (`pipeline.jobs.idempotency`), and the upload's staged
keys are renewed as long as it runs; a job too large ever to be accepted is
refused first (413); the key's quotas (`KeyQuotas`) and backpressure
(`Backlog`) are checked before anything is written and again once the
inputs are counted, before the job is committed, so a refused submission
leaves nothing queued; the key is bound to the queued job and `job.created`
is announced.

One key, one job: an upload that loses its lease (it stalled, and a retry
took the key over) stops at its next input, or at the latest just before
its job would become visible, with a `Conflict`; if it loses the key in the
instant between that check and the binding, its job is withdrawn (deleted
while still queued, else cancelled) before anyone is told of it.

Cleanup after a failure or a cancellation runs to its end, shielded from
the cancellation (`shielded`): anyio cancel scopes (the MCP SDK's,
Starlette's on a client hang-up) cancel every await inside them, cleanup
included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Sized
from typing import TYPE_CHECKING

import anyio
from redis.exceptions import RedisError

from pipeline.errors import Conflict
from pipeline.jobs.idempotency import LEASE_LOST
from pipeline.jobs.quotas import KeyQuotas
from pipeline.jobs.scripts import announce, cancel_job
from pipeline.store.replicas import Replicas
from pipeline.tasks import cancel_and_wait

if TYPE_CHECKING:
    from pipeline.jobs.backlog import Backlog
    from pipeline.jobs.idempotency import IdempotencyKeys, Items, Lease
    from pipeline.jobs.record import JobRecord
    from pipeline.jobs.scripts import JobScripts
    from pipeline.jobs.submission import JobWriter
    from pipeline.settings import Settings

logger = logging.getLogger(__name__)


async def shielded(cleanup: Awaitable[object]) -> None:
    """Run `cleanup` to its end even while the caller is being cancelled.

    A shielded scope stops anyio's cancellation, and the task behind
    `asyncio.shield` outlives a plain asyncio cancellation.
    """
    task = asyncio.ensure_future(cleanup)
    with anyio.CancelScope(shield=True):
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(task)
    if task.exception() is not None:  # cleanup must not hide why it ran
        logger.warning("cleanup failed", exc_info=task.exception())


async def _feed(writer: JobWriter, items: Items, lease: Lease, quotas: KeyQuotas) -> None:
    """Hand every input to `writer`, stopping once the lease or a quota says so."""
    if isinstance(items, AsyncIterable):
        async for item in items:
            lease.check()
            await writer.add(item)
            quotas.check_size(writer.owner, writer.total)
    elif items is not None:
        for item in items:
            await writer.add(item)
    lease.check()


class Submitter:
    """Turns written jobs into queued, announced ones (see the module docstring)."""

    def __init__(self, scripts: JobScripts, idempotency: IdempotencyKeys, backlog: Backlog,
                 settings: Settings) -> None:
        self.scripts = scripts
        self.idempotency = idempotency
        self.backlog = backlog
        self.settings = settings
        self.quotas = KeyQuotas(scripts.redis, scripts.keys, settings, backlog)
        self.replicas = Replicas(scripts.redis, scripts.keys, settings)

    async def commit(self, writer: JobWriter, items: Items = None, key: str | None = None,
                     *, interactive: bool = False) -> JobRecord:
        """Feed `items` to `writer` (if given) and commit; honours an idempotency key."""
        scope = writer.owner
        if key:
            existing = await self.idempotency.take(scope, key, writer.job_id)
            if existing is not None:
                await writer.abort()
                return await self.idempotency.replay(scope, key, existing, writer.digest, items)
        known = len(items) if isinstance(items, Sized) else 0
        try:
            # Never acceptable (413) before not now (429).
            writer.check_size(known)
            self.quotas.check_size(scope, known)
            async with (self.idempotency.leased(scope, key, writer.job_id) as lease,
                        self._kept(writer)):
                await self.quotas.check(scope, writer.job_id, known)
                await self.scripts.step("listed")
                await self.backlog.check(writer.model.name, known, interactive=interactive)
                await _feed(writer, items, lease, self.quotas)
                if writer.total > known:
                    await self.quotas.check(scope, writer.job_id, writer.total)
                    await self.backlog.check(writer.model.name, writer.total,
                                             interactive=interactive)
                record = await writer.commit(guard=lease.confirm)
            if key:
                await self._bind(writer, key)
            # Answered only once a replica has it all (where there are replicas).
            bound = [self.scripts.keys.idempotency(scope, key)] if key else []
            await self.replicas.barrier([*writer.written_keys(), *bound])
        except BaseException:
            await shielded(self.abandon(writer, key))
            raise
        await self.announce(record)
        logger.info("job %s created: %s texts, model %s", record.id, record.total,
                    record.model, extra={"event": "job.created", "job_id": record.id,
                                         "total": record.total})
        return record

    @contextlib.asynccontextmanager
    async def _kept(self, writer: JobWriter) -> AsyncIterator[None]:
        """Keep the upload's staged keys and quota listing from expiring while it runs.

        A producer that pauses longer than `staging_ttl_s` loses nothing; an
        uploader that dies stops renewing, and its keys expire by themselves.
        """
        async def renew() -> None:
            while True:
                await asyncio.sleep(self.settings.staging_ttl_s / 3)
                try:
                    await writer.keep()
                    await self.quotas.keep(writer.owner, writer.job_id)
                except RedisError:
                    logger.warning("could not renew the upload of job %s", writer.job_id,
                                   exc_info=True)

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            await cancel_and_wait(task)

    async def _bind(self, writer: JobWriter, key: str) -> None:
        """Bind the key to the queued job; if another job took the key, withdraw this one."""
        scope = writer.owner
        if not await self.idempotency.bind(scope, key, writer.job_id,
                                           writer.digest.hexdigest()):
            holder = await self.idempotency.holder(scope, key)
            if holder is not None and holder != writer.job_id:
                await self.withdraw(writer)
                raise Conflict(LEASE_LOST)
        await self.scripts.step("bound")

    async def withdraw(self, writer: JobWriter) -> None:
        """Take back a visible job nobody was told of (its key names another job)."""
        if not await self.scripts.withdraw(writer.job_id):  # a worker started it: cancel it
            await cancel_job(self.scripts, self.settings, writer.job_id)
        logger.warning("job %s withdrawn: its Idempotency-Key names another job",
                       writer.job_id)

    async def abandon(self, writer: JobWriter, key: str | None) -> None:
        """After a failed submission: drop its staged keys and free its key, if never seen."""
        try:
            # A job that became visible runs on, and its key's lapsing lease names it.
            if await writer.abort():
                await self.quotas.release(writer.owner, writer.job_id)
                if key:
                    await self.idempotency.release(writer.owner, key, writer.job_id)
        except RedisError:
            logger.warning("could not clean up job %s; its staged keys expire by themselves",
                           writer.job_id, exc_info=True)

    async def announce(self, record: JobRecord) -> None:
        """Announce `job.created` (the janitor does, if this cannot)."""
        try:
            await announce(self.scripts, record.id, "job.created", record.public(),
                           maxlen=self.settings.feed_maxlen)
            await self.scripts.step("announced")
        except RedisError:
            logger.warning("could not announce job %s", record.id, exc_info=True)
