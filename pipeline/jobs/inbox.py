"""The inbox: one stream per server process where workers put their replies to its requests.

A waiting request costs an entry in a dict, not a Redis connection: one
reader task per process (XREAD BLOCK on one blocking connection) reads the
inbox and resolves the future of each request id it names. The inbox is one
key, so every command on it is cluster-safe; a reply is one XADD (with
MAXLEN ~ and EXPIRE on the same key) of a worker's pipeline.

Deliberate choices, so nobody "fixes" them:

- The inbox id is new for every process, so its stream starts empty and the
  reader starts at `0-0`: no reply can arrive before the reader's position.
  A future is registered before its request is sent, so the fastest reply
  still finds it.
- A reply whose request has no future (its caller left, it timed out, or it
  is the second reply of a request a dead worker answered before its XACK)
  is dropped: each request is answered at most once.
- After each read the reader trims what it read (XTRIM MINID), so a live
  inbox holds only unread replies; `INBOX_MAXLEN` caps one whose reader is
  stuck, and the key expires `REPLY_TTL_S` after the last reply of a
  process that died.
- A read that fails (Redis lost) is retried after `RETRY_S` from the last id
  read, so replies that came meanwhile are not skipped.
- The reader starts with the first request and runs until `close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from pipeline.tasks import cancel_and_wait, honour_cancel

if TYPE_CHECKING:
    from pipeline.store.connections import RedisClient

logger = logging.getLogger(__name__)

READ_COUNT = 256
RETRY_S = 1.0
# Replies kept in an inbox whose reader is not reading (trimmed approximately).
INBOX_MAXLEN = 1024


class Inbox:
    """This process's reply stream: one reader resolving a future per request id."""

    def __init__(self, redis: RedisClient, blocking: RedisClient, stream: str, *,
                 block_ms: int) -> None:
        self.redis = redis
        self.blocking = blocking
        self.stream = stream
        self.block_ms = block_ms
        self.position = "0-0"
        self._waiting: dict[str, asyncio.Future[bytes]] = {}
        self._reader: asyncio.Task[None] | None = None

    @property
    def waiting(self) -> int:
        """Requests whose reply this process waits for now."""
        return len(self._waiting)

    @contextlib.contextmanager
    def expecting(self, request_id: str) -> Iterator[asyncio.Future[bytes]]:
        """A future for the request's packed reply; forgotten when the block ends."""
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._read(), name=f"inbox {self.stream}")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            yield future
        finally:
            if self._waiting.get(request_id) is future:
                del self._waiting[request_id]
            future.cancel()

    async def _read(self) -> None:
        while True:
            honour_cancel()
            try:
                await self._read_once()
            except RedisError:
                logger.warning("the inbox reader lost Redis; retrying", exc_info=True)
                await asyncio.sleep(RETRY_S)
            except Exception:  # one bad round must not strand every waiting request
                logger.exception("the inbox reader failed; retrying")
                await asyncio.sleep(RETRY_S)

    async def _read_once(self) -> None:
        """One blocking read; each reply resolves its request's future, if anyone waits."""
        reply = await self.blocking.xread({self.stream: self.position}, count=READ_COUNT,
                                          block=self.block_ms)
        if not reply:
            return
        for entry_id, fields in reply[0][1]:
            self.position = entry_id.decode()
            self.deliver(fields.get(b"req", b"").decode(), fields.get(b"reply", b""))
        await self.redis.xtrim(self.stream, minid=self.position, approximate=False)

    def deliver(self, request_id: str, packed: bytes) -> None:
        """Resolve a request's future with its packed reply; dropped when nobody waits."""
        future = self._waiting.pop(request_id, None)
        if future is None or future.done():
            logger.debug("reply to request %s dropped: nobody waits for it", request_id)
            return
        future.set_result(packed)

    async def close(self) -> None:
        """Stop the reader (the process is shutting down)."""
        if self._reader is not None:
            await cancel_and_wait(self._reader)
