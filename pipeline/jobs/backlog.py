"""Backpressure: refuse new work, with a time to come back, when a model's queue is full.

`EMBEDSTREAM_MAX_BACKLOG` bounds the texts waiting per model (both lanes);
past it, a submission is refused before anything is queued
(`Overloaded`, 429) with `retry_after_s` computed from the measured
throughput: the excess divided by texts/s. Every job counts against it,
jobs made for an interactive call (`embed`, `similarity`,
`/v1/embeddings` with more than `fast_lane_max_texts` texts, or
`truncate: false`) included, so no path queues work past it.

Interactive requests (a few texts, no job) are checked against their own
small budget, `EMBEDSTREAM_INTERACTIVE_BACKLOG`, over the fast lane only,
so a bulk flood (which sits in the bulk lane) never locks agents out; a job
made for an interactive call that lands on the fast lane is checked
against that budget as well as against `EMBEDSTREAM_MAX_BACKLOG`.

Texts waiting are estimated from the queue: entries not yet delivered to a
worker (the group's lag) times the texts an entry holds at most (the chunk
size). It errs towards refusing early, never towards queueing past the
limit. Throughput is the workers' texts counter measured over at least
`MIN_WINDOW_S`; before any measurement, `FALLBACK_RETRY_S` is advised.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, NoReturn

from pipeline.errors import Overloaded
from pipeline.store.stats import model_lanes

if TYPE_CHECKING:
    from pipeline.keys import Keys
    from pipeline.settings import Settings
    from pipeline.store.connections import RedisClient
    from pipeline.store.partitions import Partitions

MIN_WINDOW_S = 1.0
FALLBACK_RETRY_S = 10
MAX_RETRY_S = 3600


class Backlog:
    """Checks a submission against the backlog limits of its model."""

    def __init__(self, redis: RedisClient, keys: Keys, settings: Settings,
                 partitions: Partitions) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.partitions = partitions
        self._samples: tuple[float, int] | None = None
        self._rate: float | None = None

    async def waiting_texts(self, model: str, lanes: tuple[str, ...]) -> int:
        """Texts waiting (not yet delivered to a worker) in some lanes of a model, at most."""
        found = await model_lanes(self.redis, model, await self.partitions.layout(model))
        return sum(state.waiting for state in found if state.lane in lanes) \
            * self.settings.chunk_size

    def limit(self, interactive: bool) -> int:
        """Texts that may wait, for jobs or for interactive requests (0: no limit)."""
        return self.settings.interactive_backlog if interactive else self.settings.max_backlog

    async def check(self, model: str, adding: int, *, interactive: bool = False) -> None:
        """Raise Overloaded when a job of `adding` more texts would pass a limit of the model.

        Every job is checked against the jobs' limit over both lanes; one made for an
        interactive call that lands on the fast lane, against the interactive budget too.
        """
        if interactive and adding <= self.settings.fast_lane_max_texts:
            await self._check(model, adding, interactive=True)
        await self._check(model, adding, interactive=False)

    async def _check(self, model: str, adding: int, *, interactive: bool) -> None:
        limit = self.limit(interactive)
        if limit <= 0:
            return
        lanes = ("fast",) if interactive else ("fast", "bulk")
        waiting = await self.waiting_texts(model, lanes)
        if waiting + adding > limit:
            await self.refuse(model, waiting, adding, interactive=interactive)

    async def refuse(self, model: str, waiting: int, adding: int, *,
                     interactive: bool = False) -> NoReturn:
        """Raise Overloaded for `adding` texts with `waiting` already queued."""
        limit = self.limit(interactive)
        retry_s = await self.retry_after_s(waiting + adding - limit)
        kind = "interactive requests" if interactive else "jobs"
        raise Overloaded(
            f"about {waiting} texts are waiting for {model} (the limit for {kind} is {limit}); "
            f"nothing was queued: retry in {retry_s} s", retry_after_s=retry_s)

    async def retry_after_s(self, excess: int) -> int:
        """Seconds the workers need to embed `excess` texts at the measured rate."""
        rate = await self.rate()
        if not rate:
            return FALLBACK_RETRY_S
        return max(1, min(MAX_RETRY_S, math.ceil(excess / rate)))

    async def rate(self) -> float | None:
        """Texts/s the workers embedded since the previous measurement (at least 1 s ago)."""
        texts = int(await self.redis.get(self.keys.texts_counter) or 0)
        now = time.monotonic()
        if self._samples is None:
            self._samples = (now, texts)
        elif now - self._samples[0] >= MIN_WINDOW_S:
            self._rate = max(0.0, (texts - self._samples[1]) / (now - self._samples[0]))
            self._samples = (now, texts)
        return self._rate
