"""The model catalog: which workers are alive, what they serve, which model a job names.

A model not seen served is looked up afresh, so a worker that just started
is found at once. `recent` lookups (interactive requests) take a model seen
served in the last `SERVED_CACHE_S` from memory: a request then costs two
Redis round trips (queue and reply), not five; a worker that just died may
still be taken for live that second longer (its request waits for a peer,
as it would have had the worker died a moment later).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.jobs.submission import check_model_options
from pipeline.model.info import ModelInfo, find_served, resolve_model
from pipeline.store.stats import live_workers, served_models

if TYPE_CHECKING:
    from pipeline.inputs import JobOptions
    from pipeline.keys import Keys
    from pipeline.store.connections import RedisClient

SERVED_CACHE_S = 1.0


@dataclass(frozen=True)
class Readiness:
    """Whether Redis answers, and how many workers are alive."""

    redis: bool
    workers: int


class ModelCatalog:
    """The served models of one Redis, with the last answer kept for `SERVED_CACHE_S`."""

    def __init__(self, redis: RedisClient, keys: Keys, default_model: str) -> None:
        self.redis = redis
        self.keys = keys
        self.default_model = default_model
        self._served: tuple[float, list[ModelInfo]] = (-SERVED_CACHE_S, [])

    async def served(self) -> list[ModelInfo]:
        """The models that live workers serve, by name."""
        served = await served_models(self.redis, self.keys)
        self._served = (time.monotonic(), served)
        return served

    async def resolve(self, options: JobOptions, *, recent: bool = False) -> ModelInfo:
        """The model a job with these options will use; raises for unknown models or options."""
        seen_at, served = self._served
        info = None
        if recent and time.monotonic() - seen_at < SERVED_CACHE_S:
            info = find_served(served, self.default_model, options.model)
        if info is None:
            info = await resolve_model(self.redis, self.keys.models, self.default_model,
                                       options.model, await self.served())
        check_model_options(options, info)
        return info

    async def readiness(self) -> Readiness:
        """Whether Redis answers (else the call raises) and how many workers are alive."""
        await self.redis.ping()
        return Readiness(True, len(await live_workers(self.redis, self.keys)))
