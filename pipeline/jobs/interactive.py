"""Interactive requests: a few texts embedded without a job.

A job costs a record, an inputs hash, queue entries, a result stream, feed
events and a stream follower. An interactive request (`/v1/embeddings`, MCP
`embed` and `similarity`, `search_job`'s query: at most
`fast_lane_max_texts` texts) is one fast-lane entry that carries its texts
and options and names the inbox of the server process that waits for it
(`pipeline.jobs.inbox`):

    server  XADD <fast lane> req=<id> n=<texts> inputs=<packed> options=<json> inbox=<server>
            (one script with the backlog check: `EMBEDSTREAM_INTERACTIVE_BACKLOG`)
    worker  embeds it, XADD <p>:inbox:<server> MAXLEN ~ req=<id> reply=<meta, vectors>
            and EXPIRE (one key), then XACK
    server  its one inbox reader resolves the request's future

A waiting request costs a future, not a Redis connection: one reader per
process reads every reply. Crash safety is the queue's: the entry sits in
the consumer group like any other, so a worker that dies holding it leaves
it pending, and a peer reclaims it after the visibility timeout and replies
(a poison request is given up on with a failed reply, as a chunk would be).
A reply pushed twice (a worker died between its XADD and XACK) is read
once: the first resolves the future, the second finds none and is dropped,
as is the reply to a request whose caller left (it timed out, or its HTTP
client hung up; the request is still embedded, one short model call). No
feed events are published for a request (a dashboard's feed would
otherwise fill with two events per query); requests count in `texts
embedded` and in the `interactive_requests` counter.

An entry without `inbox` (sent by an older server, during a rolling
upgrade) is still answered the old way, RPUSH + EXPIRE on
`<p>:{r:<id>}:reply`, which that server BLPOPs; this one never sends them.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import orjson

from pipeline import tracing
from pipeline.errors import Unavailable
from pipeline.jobs.inbox import INBOX_MAXLEN
from pipeline.jobs.record import JobRecord, JobStatus
from pipeline.jobs.results import ResultRow, render_rows
from pipeline.jobs.submission import pack_chunk
from pipeline.keys import GROUP
from pipeline.model.prompts import resolve_prompt

if TYPE_CHECKING:
    from pipeline.inputs import Item, JobOptions
    from pipeline.jobs.backlog import Backlog
    from pipeline.jobs.inbox import Inbox
    from pipeline.jobs.quantize import VectorView, Views
    from pipeline.keys import Keys
    from pipeline.model.info import ModelInfo
    from pipeline.settings import Settings
    from pipeline.store.commands import RedisPipeline
    from pipeline.store.connections import RedisClient

REPLY_TTL_S = 120
NO_WORKER_IN_TIME = ("no worker finished the embedding in time; is a worker running for this "
                     "model? (GET /readyz tells)")
# Told (texts done, texts in all) as an embedding advances.
ProgressCallback = Callable[[int, int], Awaitable[None]]


class RequestOptions(TypedDict):
    """What a worker needs to embed a request as a job's chunk would be (sent as JSON)."""

    model: str
    normalize: bool
    dimensions: int
    model_dimensions: int
    prompt: str
    chunk: bool
    chunk_overlap: int
    chunk_output: str
    chunking: str
    chunk_tokens: int  # 0: the model's window
    chunk_boundary: str
    owner: str  # the caller's owner id ("": trusted), the scope of the embedding cache


@dataclass(frozen=True)
class Embeddings:
    """A few texts embedded and waited for: the rows in index order, and what made them.

    `id` names the job, or the interactive request (which has no job); the
    status is the job's, or for a request `completed` unless every input failed.
    """

    id: str
    status: JobStatus
    model: str
    dimensions: int
    done: int
    failed: int
    tokens: int
    rows: list[ResultRow]

    @classmethod
    def of_job(cls, record: JobRecord, rows: list[ResultRow]) -> Embeddings:
        """What a job made of a few texts, as its (finished) record says."""
        return cls(record.id, record.status, record.model, record.dimensions, record.done,
                   record.failed, record.tokens, rows)

# KEYS: the fast lane.  ARGV: group, limit (texts; 0 for none), texts an entry
# counts for, texts adding, then the entry's field/value pairs.
# The backlog check and the XADD in one step: {'queued', id} or {'full', waiting texts}.
_SEND = """
local limit = tonumber(ARGV[2])
if limit > 0 then
  local waiting = nil
  local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
  if type(groups) == 'table' and not groups.err then
    for _, group in ipairs(groups) do
      local fields = {}
      for j = 1, #group, 2 do fields[group[j]] = group[j + 1] end
      if fields['name'] == ARGV[1] then waiting = fields['lag'] end
    end
    if not waiting then waiting = redis.call('XLEN', KEYS[1]) end
  else
    waiting = 0  -- no lane yet
  end
  waiting = tonumber(waiting) * tonumber(ARGV[3])
  if waiting + tonumber(ARGV[4]) > limit then return {'full', waiting} end
end
return {'queued', redis.call('XADD', KEYS[1], '*', unpack(ARGV, 5))}
"""


def is_light(items: list[Item], options: JobOptions, max_texts: int) -> bool:
    """Whether a request can skip the job machinery.

    `truncate: false` without `chunk` keeps the job path: its length check,
    with the exact error it gives, happens at submission.
    """
    return len(items) <= max_texts and (options.truncate or options.chunk)


def request_options(options: JobOptions, model: ModelInfo, owner: str = "") -> RequestOptions:
    """What a worker needs to embed the request as a job's chunk would be."""
    dims = options.dimensions or model.dimensions
    return {"model": model.name, "normalize": options.normalize, "dimensions": dims,
            "model_dimensions": model.dimensions, "prompt": resolve_prompt(options, model),
            "chunk": options.chunk, "chunk_overlap": options.chunk_overlap,
            "chunk_output": options.chunk_output, "chunking": options.chunking,
            "chunk_tokens": options.chunk_tokens or 0, "chunk_boundary": options.chunk_boundary,
            "owner": owner}


class Sender:
    """Queues requests on a fast lane, unless its backlog is full (one round trip)."""

    def __init__(self, redis: RedisClient, limit: int, entry_texts: int, inbox: str = "") -> None:
        self.limit = limit
        self.entry_texts = entry_texts
        self.inbox = inbox
        self._send = redis.register_script(_SEND)

    async def send(self, stream: str, items: list[Item], options: RequestOptions,
                   request_id: str | None = None) -> str | int:
        """The request's id, or the texts waiting when the lane is full (nothing queued)."""
        request_id = request_id or uuid.uuid4().hex
        fields: list[bytes | str | int] = [
            "req", request_id, "n", len(items), "inputs", pack_chunk(items),
            "options", orjson.dumps(options)]
        if self.inbox:
            fields += ["inbox", self.inbox]
        if parent := tracing.traceparent():  # "" when tracing is off: no extra bytes
            fields += [tracing.ENTRY_FIELD, parent]
        outcome, value = await self._send(
            keys=[stream], args=[GROUP, self.limit, self.entry_texts, len(items), *fields])
        if outcome in (b"full", "full"):
            return int(value)
        return request_id


@dataclass(frozen=True)
class Reply:
    """What a worker made of a request: the stored-chunk pair `render_rows` reads."""

    meta: bytes
    vectors: bytes

    def pack(self) -> bytes:
        """Length of meta (4 bytes, little-endian), meta, then the float32 vectors."""
        return len(self.meta).to_bytes(4, "little") + self.meta + self.vectors

    @classmethod
    def unpack(cls, raw: bytes) -> Reply:
        """The inverse of `pack`."""
        size = int.from_bytes(raw[:4], "little")
        return cls(raw[4:4 + size], raw[4 + size:])

    @property
    def tokens(self) -> int:
        """Tokens embedded, prompt and special tokens included."""
        return int(orjson.loads(self.meta).get("tokens", 0))


def queue_reply(pipe: RedisPipeline, keys: Keys, request_id: str, reply: Reply,
                inbox: str = "") -> None:
    """Add the reply's XADD to the server's inbox, and its EXPIRE, to a pipeline (one key).

    Without an inbox (an older server's request): RPUSH to the request's reply list.
    """
    if inbox:
        name = keys.inbox(inbox)
        pipe.xadd(name, {"req": request_id, "reply": reply.pack()}, maxlen=INBOX_MAXLEN)
    else:
        name = keys.reply(request_id)
        pipe.rpush(name, reply.pack())
    pipe.expire(name, REPLY_TTL_S)


class Requests:
    """Embeds a few texts as one interactive request: send, wait for the reply, render it."""

    def __init__(self, redis: RedisClient, inbox: Inbox, server_id: str, keys: Keys,
                 views: Views, backlog: Backlog, settings: Settings) -> None:
        self.inbox = inbox
        self.keys = keys
        self.views = views
        self.backlog = backlog
        self.sender = Sender(redis, backlog.limit(interactive=True), settings.chunk_size,
                             server_id)

    async def embed(
        self, items: list[Item], options: JobOptions, model: ModelInfo, encoding: str,
        on_progress: ProgressCallback | None, timeout_s: float, owner: str = "",
    ) -> Embeddings:
        """Embed `items` with `model` and wait at most `timeout_s` for a worker's reply."""
        sent = request_options(options, model, owner)
        view = await self._view(encoding, sent)
        request_id = uuid.uuid4().hex
        tracing.annotate({"embedstream.request.id": request_id})
        reply = Reply.unpack(await self._ask(request_id, model.name, items, sent, timeout_s))
        with tracing.span("deliver", {"embedstream.request.id": request_id}):
            rows = render_rows(0, reply.vectors, reply.meta, view)
        if on_progress is not None:
            await on_progress(len(rows), len(rows))
        failed = sum(1 for row in rows if row.get("embedding") is None)
        status = JobStatus.COMPLETED if failed < len(rows) else JobStatus.FAILED
        return Embeddings(request_id, status, sent["model"], sent["dimensions"],
                          len(rows) - failed, failed, reply.tokens, rows)

    async def _ask(self, request_id: str, model: str, items: list[Item], sent: RequestOptions,
                   timeout_s: float) -> bytes:
        """Send the request and wait for its packed reply; the wait is forgotten on exit."""
        # Expected before it is sent: the fastest reply still finds its waiter.
        with self.inbox.expecting(request_id) as reply:
            queued = await self.sender.send(self.keys.queue(model, "fast"), items, sent,
                                            request_id)
            if isinstance(queued, int):  # the fast lane's backlog is full: nothing queued
                await self.backlog.refuse(model, queued, len(items), interactive=True)
            try:
                async with asyncio.timeout(timeout_s):
                    return await reply
            except TimeoutError:
                raise Unavailable(NO_WORKER_IN_TIME) from None

    async def _view(self, encoding: str, sent: RequestOptions) -> VectorView:
        """How the request's vectors are delivered in `encoding`."""
        dims, model_dims = sent["dimensions"], sent["model_dimensions"]
        return await self.views.for_shape(encoding, sent["model"], model_dims,
                                          dims if dims < model_dims else None,
                                          sent["normalize"])
