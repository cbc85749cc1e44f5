"""Interactive requests: a few texts embedded without a job.

A job costs a record, an inputs hash, queue entries, a result stream, feed
events and a stream follower. An interactive request (`/v1/embeddings`, MCP
`embed` and `similarity`, `search_job`'s query: at most
`fast_lane_max_texts` texts) is one fast-lane entry that carries its texts
and options, and one reply list the server blocks on:

    server  XADD <fast lane> req=<id> n=<texts> inputs=<packed> options=<json>
            (one script with the backlog check: `EMBEDSTREAM_INTERACTIVE_BACKLOG`)
    worker  embeds it, RPUSH + EXPIRE <p>:{r:<id>}:reply <meta, vectors>, then XACK
    server  BLPOP <p>:{r:<id>}:reply

Crash safety is the queue's: the entry sits in the consumer group like any
other, so a worker that dies holding it leaves it pending, and a peer
reclaims it after the visibility timeout and replies (a poison request is
given up on with a failed reply, as a chunk would be). A reply pushed twice
(a worker died between RPUSH and XACK) is read once; the list expires. A
request whose caller went away is still embedded (one short model call) and
its reply expires unread. No feed events are published for a request (a
dashboard's feed would otherwise fill with two events per query); requests
count in `texts embedded` and in the `interactive_requests` counter.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.jobs.submission import pack_chunk
from pipeline.keys import GROUP
from pipeline.model.prompts import resolve_prompt

if TYPE_CHECKING:
    from pipeline.inputs import Item, JobOptions
    from pipeline.keys import Keys
    from pipeline.model.info import ModelInfo
    from pipeline.store.connections import RedisClient

REPLY_TTL_S = 120

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


def request_options(options: JobOptions, model: ModelInfo) -> dict[str, Any]:
    """What a worker needs to embed the request as a job's chunk would be."""
    dims = options.dimensions or model.dimensions
    return {"model": model.name, "normalize": options.normalize, "dimensions": dims,
            "model_dimensions": model.dimensions, "prompt": resolve_prompt(options, model),
            "chunk": options.chunk, "chunk_overlap": options.chunk_overlap}


class Sender:
    """Queues requests on a fast lane, unless its backlog is full (one round trip)."""

    def __init__(self, redis: RedisClient, limit: int, entry_texts: int) -> None:
        self.limit = limit
        self.entry_texts = entry_texts
        self._send = redis.register_script(_SEND)

    async def send(self, stream: str, items: list[Item], options: dict[str, Any]) -> str | int:
        """The request's id (its reply key's tag), or the texts waiting when the lane is full."""
        request_id = uuid.uuid4().hex
        fields = ["req", request_id, "n", len(items), "inputs", pack_chunk(items),
                  "options", orjson.dumps(options)]
        outcome, value = await self._send(
            keys=[stream], args=[GROUP, self.limit, self.entry_texts, len(items), *fields])
        if outcome in (b"full", "full"):
            return int(value)
        return request_id


async def await_reply(
    blocking: RedisClient, keys: Keys, request_id: str, timeout_s: float
) -> Reply | None:
    """The worker's reply, or None after `timeout_s`."""
    answer = await blocking.blpop([keys.reply(request_id)], timeout=max(1, round(timeout_s)))
    return None if answer is None else Reply.unpack(answer[1])


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


def queue_reply(pipe: Any, keys: Keys, request_id: str, reply: Reply) -> None:
    """Add the reply's RPUSH and EXPIRE to a pipeline (one key: one slot)."""
    name = keys.reply(request_id)
    pipe.rpush(name, reply.pack())
    pipe.expire(name, REPLY_TTL_S)


def view_record(sent: dict[str, Any]) -> dict[str, Any]:
    """What decides how a request's vectors are delivered (`Views.for_shape`'s arguments)."""
    dims, model_dims = int(sent["dimensions"]), int(sent["model_dimensions"])
    return {"model": sent["model"], "model_dimensions": model_dims,
            "output_dimensions": dims if dims < model_dims else None,
            "normalize": bool(sent["normalize"])}


def request_job(request_id: str, sent: dict[str, Any], rows: list[dict[str, Any]],
                reply: Reply) -> dict[str, Any]:
    """What a finished request looks like to callers of `Pipeline.embed` (a job's shape)."""
    failed = sum(1 for row in rows if row.get("embedding") is None)
    return {"id": request_id, "status": "completed" if failed < len(rows) else "failed",
            "total": len(rows), "done": len(rows) - failed, "failed": failed,
            "model": sent["model"], "dimensions": sent["dimensions"], "tokens": reply.tokens}
