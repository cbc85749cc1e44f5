"""The worker's side of interactive requests (see `pipeline.jobs.interactive`).

A request entry carries its texts and options, so it becomes `Work` without
a read (`workers.work.request_work`), and its result goes to the inbox of
the server that sent it instead of a job's commit script: XADD (capped) and
EXPIRE on that one key, then XACK, then the texts counter. A crash before
the XACK leaves the entry pending, to be reclaimed and answered by a peer;
the server takes the first reply only. An entry that names no inbox (an
older server's) is answered on its reply list, as that server expects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import GROUP
from pipeline.jobs import Reply, queue_reply
from pipeline.store import metrics

if TYPE_CHECKING:
    from pipeline import Keys
    from pipeline.jobs import ChunkResult
    from pipeline.store import RedisClient
    from workers.work import Entry


async def reply(redis: RedisClient, keys: Keys, texts_counter: str,
                results: list[ChunkResult], entries: list[Entry]) -> None:
    """Push each request's reply, then ack, then count (one round trip for replies)."""
    async with redis.pipeline(transaction=False) as pipe:
        for result, entry in zip(results, entries, strict=True):
            queue_reply(pipe, keys, result.job_id, Reply(result.meta(), result.stored_vectors()),
                        entry.reply_to)
        await pipe.execute()
    # Acked only once every reply is stored: a crash in between means a second reply.
    async with redis.pipeline(transaction=False) as pipe:
        for entry in entries:
            pipe.xack(entry.stream, GROUP, entry.entry_id)
        pipe.incrby(texts_counter, sum(len(r.vectors) - len(r.errors) for r in results))
        metrics.count(pipe, keys, "interactive_requests", len(results))
        await pipe.execute()
