"""The submitter: commits a written job, abandons a failed one, announces a created one.

`Submitter.commit` runs a submission's steps in order (see
`pipeline.jobs.submission` for what each leaves behind if the process dies):
the Idempotency-Key is taken (or names the job to replay) and leased while
the inputs stream in (`pipeline.jobs.idempotency`); backpressure (`Backlog`)
is checked before anything is written and again once the inputs are
counted, before the job is committed, so a refused submission leaves
nothing queued; the key is bound to the queued job and `job.created` is
announced.

Cleanup after a failure or a cancellation runs to its end, shielded from
the cancellation (`shielded`): anyio cancel scopes (the MCP SDK's,
Starlette's on a client hang-up) cancel every await inside them, cleanup
included.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, Awaitable, Sized
from typing import TYPE_CHECKING

import anyio
from redis.exceptions import RedisError

from pipeline.jobs.scripts import announce

if TYPE_CHECKING:
    from pipeline.jobs.backlog import Backlog
    from pipeline.jobs.idempotency import IdempotencyKeys, Items
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


async def _feed(writer: JobWriter, items: Items) -> None:
    if isinstance(items, AsyncIterable):
        async for item in items:
            await writer.add(item)
    elif items is not None:
        await writer.add_many(items)


class Submitter:
    """Turns written jobs into queued, announced ones (see the module docstring)."""

    def __init__(self, scripts: JobScripts, idempotency: IdempotencyKeys, backlog: Backlog,
                 settings: Settings) -> None:
        self.scripts = scripts
        self.idempotency = idempotency
        self.backlog = backlog
        self.settings = settings

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
            async with self.idempotency.leased(scope, key, writer.job_id):
                await self.backlog.check(writer.model.name, known, interactive=interactive)
                await _feed(writer, items)
                if writer.total > known:
                    await self.backlog.check(writer.model.name, writer.total,
                                             interactive=interactive)
                record = await writer.commit()
            if key:
                await self.idempotency.bind(scope, key, writer.job_id, writer.digest.hexdigest())
                await self.scripts.step("bound")
        except BaseException:
            await shielded(self.abandon(writer, key))
            raise
        await self.announce(record)
        logger.info("job %s created: %s texts, model %s", record.id, record.total,
                    record.model, extra={"event": "job.created", "job_id": record.id,
                                         "total": record.total})
        return record

    async def abandon(self, writer: JobWriter, key: str | None) -> None:
        """After a failed submission: drop its staged keys and free its key, if never seen."""
        try:
            # A job that became visible runs on, and its key's lapsing lease names it.
            if await writer.abort() and key:
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
