"""Worker-side figures for Prometheus, kept in Redis so every server replica reports them.

A worker's numbers (batch sizes, embedding durations, inputs given up on)
are made in the worker, but `/metrics` is scraped from servers, any number of
them. So workers add their observations to one Redis hash (`keys.metrics`)
and each server renders that hash at scrape time: every replica reports the
same, pipeline-wide figures.

Fields of the hash:

    c:<name>                a counter (HINCRBY / HINCRBYFLOAT)
    w:<worker id>:batches   model calls made by one worker
    h:<name>:le:<bound>     a histogram bucket, already cumulative: an
                            observation increments every bucket it fits in
    h:<name>:count, :sum    the histogram's count and sum

Recording is best effort (a Redis hiccup costs a metric, never a batch) and
one round trip per batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

if TYPE_CHECKING:
    from pipeline.keys import Keys
    from pipeline.store.commands import RedisPipeline
    from pipeline.store.connections import RedisClient

logger = logging.getLogger(__name__)

HISTOGRAMS: Mapping[str, tuple[float, ...]] = {
    "batch_texts": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    "batch_tokens": (16, 64, 256, 1024, 4096, 16384, 65536),
    "embed_seconds": (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
}


@dataclass(frozen=True)
class Histogram:
    """A histogram read back: cumulative buckets (bound, count), count and sum."""

    buckets: list[tuple[float, float]]
    count: float
    sum: float


def _bound(value: float) -> str:
    return f"{value:g}"


def observe(pipe: RedisPipeline, keys: Keys, name: str, value: float) -> None:
    """Add one observation of histogram `name` to a Redis pipeline."""
    for bound in HISTOGRAMS[name]:
        if value <= bound:
            pipe.hincrby(keys.metrics, f"h:{name}:le:{_bound(bound)}", 1)
    pipe.hincrby(keys.metrics, f"h:{name}:count", 1)
    pipe.hincrbyfloat(keys.metrics, f"h:{name}:sum", value)


def count(pipe: RedisPipeline, keys: Keys, name: str, amount: float = 1) -> None:
    """Add to counter `name` in a Redis pipeline."""
    if isinstance(amount, int):
        pipe.hincrby(keys.metrics, f"c:{name}", amount)
    else:
        pipe.hincrbyfloat(keys.metrics, f"c:{name}", amount)


async def record_batch(
    redis: RedisClient, keys: Keys, worker_id: str, texts: int, tokens: int, embed_s: float
) -> None:
    """One model call of a worker: its texts, tokens and duration."""
    async with redis.pipeline(transaction=False) as pipe:
        observe(pipe, keys, "batch_texts", texts)
        observe(pipe, keys, "batch_tokens", tokens)
        observe(pipe, keys, "embed_seconds", embed_s)
        count(pipe, keys, "batches")
        # Per worker, for the dashboard's workers table. A dead worker's field
        # stays behind (one small field a worker lifetime; the hash has no TTL).
        pipe.hincrby(keys.metrics, f"w:{worker_id}:batches", 1)
        await send(pipe)


async def record_given_up(redis: RedisClient, keys: Keys, inputs: int) -> None:
    """Inputs failed as poison after too many deliveries."""
    async with redis.pipeline(transaction=False) as pipe:
        count(pipe, keys, "inputs_given_up", inputs)
        await send(pipe)


async def send(pipe: RedisPipeline) -> None:
    """Run a pipeline of metric writes, best effort."""
    try:
        await pipe.execute()
    except RedisError:
        logger.warning("could not record metrics", exc_info=True)


async def read_metrics(
    redis: RedisClient, keys: Keys
) -> tuple[dict[str, float], dict[str, Histogram]]:
    """Every counter and histogram in the hash."""
    raw = {k.decode(): float(v) for k, v in (await redis.hgetall(keys.metrics)).items()}
    counters = {k[2:]: v for k, v in raw.items() if k.startswith("c:")}
    histograms = {
        name: Histogram([(bound, raw.get(f"h:{name}:le:{_bound(bound)}", 0.0))
                         for bound in bounds],
                        raw.get(f"h:{name}:count", 0.0), raw.get(f"h:{name}:sum", 0.0))
        for name, bounds in HISTOGRAMS.items()
    }
    return counters, histograms
