"""Telling MCP clients that their tasks changed, from one follower of the live feed.

    2025-11-25   the connection that made a task gets `notifications/tasks/status`
                 (the Task object) when its status changes, and, if the call carried
                 a progressToken, `notifications/progress` under that token until
                 the task ends; both on the connection's standalone stream
    2026-07-28   a `subscriptions/listen` stream whose filter names `taskIds` gets
                 `notifications/tasks` (the task as `tasks/get` shows it, result
                 inline) on that stream (`mcp_server.task_listens`)

A `Watcher` is one receiver (a connection, or a listen stream) and the tasks
it watches, at most `MAX_WATCHED_TASKS`. `TaskNotices` is the process's
registry of watchers by job, and its one follower of the pipeline's live
feed, which reads through the feed's fan-out hub: however many tasks are
watched, they cost no Redis connection of their own. A job event wakes the
watchers of that job; each reads the job's record and tells its client when
what it would show has changed, so a repeated or late event is harmless.

Deliberate choices, so nobody "fixes" them:

- No change is lost between a task's creation and its first event: the
  follower resumes from the feed's tail as read before the watcher's first
  look at the record (`watch`), and from its own last position after a lost
  Redis. It follows the feed only while some task is watched.
- A watcher of the 2025-11-25 wire lives as long as its connection: it is
  stopped by the connection's `exit_stack` (the SDK's per-connection
  teardown). The SDK's per-request `ServerSession` holds the connection but
  does not expose it, hence `connection_of`. A connection with no standalone
  stream (stateless HTTP) has nowhere to send, so nothing is watched for it.
- Progress events wake only watchers whose task carries a progressToken: a
  task's status changes only when its job ends.
- A full watcher watches no more tasks; its client polls `tasks/get`, as the
  spec tells clients to do anyway.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anyio
import anyio.abc
from mcp.server.connection import Connection
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import INVALID_PARAMS
from redis.exceptions import RedisError

from mcp_server.task_store import RELATED_TASK, TaskId, TaskStore
from pipeline import PipelineError
from pipeline.jobs import Caller, JobRecord, feed_replay_start

logger = logging.getLogger(__name__)

MAX_WATCHED_TASKS = 100
RETRY_S = 1.0
LEGACY_STATUS = "notifications/tasks/status"
MODERN_STATUS = "notifications/tasks"
PROGRESS_EVENT = "job.progress"
WATCHER_STATE = "embedstream.task_watcher"
Notify = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclasses.dataclass
class Watched:
    """One watched task: whose it is, and what its client has been shown of it."""

    task: TaskId
    caller: Caller
    shown: str | None = None
    progress_token: str | int | None = None
    progress: int = -1


class Watcher:
    """One receiver of task changes and the tasks it watches, with the jobs woken for it."""

    def __init__(self, notify: Notify, *, modern: bool, meta: dict[str, Any] | None = None
                 ) -> None:
        self.notify = notify
        self.modern = modern
        self.meta = meta or {}
        self.tasks: dict[str, Watched] = {}
        self.scope = anyio.CancelScope()
        self._woken: dict[str, None] = {}
        self._wake = anyio.Event()

    def add(self, watched: Watched) -> bool:
        """Watch a task, unless the watcher is full (True if it is watched)."""
        key = str(watched.task)
        if key not in self.tasks and len(self.tasks) >= MAX_WATCHED_TASKS:
            return False
        self.tasks[key] = watched
        return True

    def of_job(self, job_id: str) -> list[Watched]:
        """The watched tasks of one job (a job can be a `submit_job` and an `embed` task)."""
        return [watched for watched in self.tasks.values() if watched.task.job_id == job_id]

    def wake(self, job_id: str, event: str | None = None) -> None:
        """Note that a job changed; progress counts only for a task with a progressToken."""
        watched = self.of_job(job_id)
        if event == PROGRESS_EVENT and not any(w.progress_token is not None for w in watched):
            return
        if watched:
            self._woken[job_id] = None
            self._wake.set()

    async def woken(self) -> list[str]:
        """The jobs woken since the last call, once there is at least one."""
        while not self._woken:
            await self._wake.wait()
            self._wake = anyio.Event()
        jobs = list(self._woken)
        self._woken.clear()
        return jobs


class TaskNotices:
    """The process's watchers by job, and the feed follower that wakes them."""

    def __init__(self, store: TaskStore) -> None:
        self.store = store
        self.watchers: dict[str, set[Watcher]] = {}
        self._cursor: str | None = None
        self._wanted = anyio.Event()
        self._starting = anyio.Lock()
        self._group: anyio.abc.TaskGroup | None = None

    @property
    def following(self) -> bool:
        """Whether the follower is (or is about to be) reading the feed."""
        return self._cursor is not None

    @asynccontextmanager
    async def running(self, _server: Any = None) -> AsyncIterator[None]:
        """Run the follower (and 2025-11-25 watchers) while open; nested entries share it."""
        if self._group is not None:
            yield
            return
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                group.start_soon(self._follow)
                try:
                    yield
                finally:
                    group.cancel_scope.cancel()
        finally:
            self._group = None

    async def watch_for_connection(self, session: ServerSession, watched: Watched) -> None:
        """Watch a task made on a 2025-11-25 connection, for as long as the connection lives."""
        connection = connection_of(session)
        if self._group is None or not connection.has_standalone_channel:
            return
        watcher = connection.state.get(WATCHER_STATE)
        if not isinstance(watcher, Watcher):
            watcher = Watcher(connection.notify, modern=False)
            connection.state[WATCHER_STATE] = watcher
            connection.exit_stack.callback(watcher.scope.cancel)
            self._group.start_soon(self.serve, watcher)
        await self.watch(watcher, watched)

    async def watch(self, watcher: Watcher, watched: Watched) -> bool:
        """Watch a task for `watcher` and look at it once now (False if the watcher is full)."""
        if not watcher.add(watched):
            logger.debug("a watcher is full; task %s is not watched", watched.task)
            return False
        job_id = watched.task.job_id
        self.watchers.setdefault(job_id, set()).add(watcher)
        try:
            await self._follow_from_now()
        except RedisError:
            # Telling is a courtesy: the task stands, and its client polls.
            logger.warning("task %s not watched: the feed is unreachable", watched.task)
            self._unwatch(watcher, watched)
            return False
        watcher.wake(job_id)
        return True

    async def serve(self, watcher: Watcher, tasks: Iterable[Watched] = ()) -> None:
        """Watch `tasks`, then tell the watcher's client of each change until cancelled."""
        try:
            with watcher.scope:
                for watched in tasks:
                    await self.watch(watcher, watched)
                while True:
                    for job_id in await watcher.woken():
                        for watched in watcher.of_job(job_id):
                            await self._tell(watcher, watched)
        finally:
            for job_id in {watched.task.job_id for watched in watcher.tasks.values()}:
                self._forget(watcher, job_id)
            watcher.tasks.clear()

    async def _tell(self, watcher: Watcher, watched: Watched) -> None:
        """Send what changed of one task; stop watching it once it has ended."""
        try:
            record = await self.store.job(watched.task, watched.caller)
        except MCPError as error:
            if error.code == INVALID_PARAMS:  # expired, or gone
                self._unwatch(watcher, watched)
            else:
                logger.warning("task %s not read: %s", watched.task, error.message)
            return
        if watched.progress_token is not None and not watcher.modern:
            await self._progress(watcher, watched, record)
        shown = self.store.task(watched.task, record, modern=watcher.modern)
        if shown["status"] != watched.shown:
            watched.shown = shown["status"]
            if watcher.modern:
                shown = await self.store.detailed(watched.task, record, watched.caller)
                await watcher.notify(MODERN_STATUS, {**shown, "_meta": watcher.meta})
            else:
                await watcher.notify(LEGACY_STATUS, shown)
        if record.finished:
            self._unwatch(watcher, watched)

    async def _progress(self, watcher: Watcher, watched: Watched, record: JobRecord) -> None:
        done = record.done + record.failed
        if done > watched.progress:
            watched.progress = done
            await watcher.notify("notifications/progress", {
                "progressToken": watched.progress_token, "progress": done, "total": record.total,
                "message": f"{done} of {record.total} texts embedded",
                "_meta": {RELATED_TASK: {"taskId": str(watched.task)}}})

    def _unwatch(self, watcher: Watcher, watched: Watched) -> None:
        watcher.tasks.pop(str(watched.task), None)
        if not watcher.of_job(watched.task.job_id):
            self._forget(watcher, watched.task.job_id)

    def _forget(self, watcher: Watcher, job_id: str) -> None:
        watchers = self.watchers.get(job_id)
        if watchers is not None:
            watchers.discard(watcher)
            if not watchers:
                del self.watchers[job_id]

    async def _follow_from_now(self) -> None:
        """Make sure the follower reads every feed event from now on."""
        async with self._starting:
            if self._cursor is None:
                self._cursor = await feed_replay_start(self.store.pipeline.redis,
                                                       self.store.pipeline.keys, 0)
                self._wanted.set()

    async def _follow(self) -> None:
        while True:
            await self._wanted.wait()
            try:
                await self._read_feed()
            except (PipelineError, RedisError):
                logger.warning("task notices lost the feed; retrying", exc_info=True)
                await anyio.sleep(RETRY_S)
            except Exception:
                # The follower shares a task group with every watcher: a bug here must
                # cost clients their notifications, not their connections.
                logger.exception("task notices failed; retrying")
                await anyio.sleep(RETRY_S)
            if not self.watchers:
                self._cursor = None
                self._wanted = anyio.Event()

    async def _read_feed(self) -> None:
        feed = self.store.pipeline.follow_feed(after=self._cursor)
        async with aclosing(feed):
            async for event in feed:
                self._cursor = event.id
                if event.name.startswith("job.") and isinstance(event.data, dict):
                    job_id = str(event.data.get("id"))
                    for watcher in list(self.watchers.get(job_id, ())):
                        watcher.wake(job_id, event.name)
                if not self.watchers:
                    return


def connection_of(session: ServerSession) -> Connection:
    """The connection a request's session speaks for (the SDK keeps it private in 2.3)."""
    connection: Connection = session._connection
    return connection
