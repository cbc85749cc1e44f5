"""The shared embedding cache: raw model output per text, in Redis, for every worker.

An entry is keyed by a fingerprint of what makes the vector (model,
revision: a hash of the model's files, backend, precision) and a hash of
the text as the model sees it (`text_hash`: the place where a prompt or any
other input that changes the raw vector joins the text). The value is the
raw model output (float32 bytes) and the text's token count, before any
`dimensions` or `normalize` is applied, so every job's options reuse it.

Bounds:

- every entry has a TTL (`cache_ttl_s`, refreshed when stored again);
- `cache:index` (a sorted set of entry key -> time stored) caps the number
  of entries at `cache_max_entries`: past it, the oldest stored are deleted.
  Only cache keys are ever deleted here, never a queue or job key.
- Under Redis `maxmemory`: with `noeviction` (Valkey's default, and what a
  queue wants) a write that hits the limit fails; cache writes are best
  effort, so that is a lost cache entry, never a failed batch. With a
  `volatile-*` or `allkeys-*` policy Redis itself may evict cache entries
  (fine) but also job and queue keys (not fine): do not run embedstream
  under those policies; size `cache_max_entries` to fit instead (an entry of
  all-MiniLM-L6-v2 is about 1.7 kB with its index member).

Scope (`cache_scope`): with "tenant" an entry's text hash also covers the
owner of the job or request (`Work.owner`), so one tenant's cached vector never
answers another tenant's text: a hit is fast and a miss costs a model call, so a
shared entry would tell a tenant, by the time its answer takes, whether someone
else had embedded a given text. With "global" every owner shares each entry
(more hits, fine for a single tenant or tenants that trust each other). "auto"
is "tenant" when API keys are set, else "global". Both scopes share the one
`cache:index`, its cap and the TTL. The caller with no key (owner "") is a
tenant of its own under "tenant"; entries of the two scopes never share a key.

Deliberate choices, so nobody "fixes" them: entries carry no hash tag and
are read and written with per-key commands in a non-transactional pipeline,
so on Redis Cluster they spread over every node and no command spans slots.
A cache failure of any kind degrades to a miss. Hits and misses are
counters in `keys.metrics` (`pipeline.store.metrics`), so /metrics shows them as
`embedstream_cache_hits` and `embedstream_cache_misses`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from redis.exceptions import RedisError

from pipeline import PipelineError
from pipeline.store import metrics

if TYPE_CHECKING:
    from pipeline import Keys, Settings
    from pipeline.store import RedisClient

logger = logging.getLogger(__name__)

_TOKENS = np.dtype("<i4")
SCOPES = ("tenant", "global", "auto")
# (owner, text) as the cache sees it: the owner is "" under the global scope.
Scoped = tuple[str, str]


def cache_scope(settings: Settings) -> str:
    """The cache scope in force, "tenant" or "global" ("auto": tenant when keys are set)."""
    scope = settings.cache_scope.strip().lower()
    if scope not in SCOPES:
        raise PipelineError(f"EMBEDSTREAM_CACHE_SCOPE must be one of {', '.join(SCOPES)}, "
                            f"not {settings.cache_scope!r}")
    if scope == "auto":
        return "tenant" if settings.api_keys or settings.admin_keys else "global"
    return scope


def fingerprint(model: str, revision: str, backend: str, dtype: str = "float32") -> str:
    """A short name for everything besides the text that changes a raw vector."""
    raw = "\0".join((model, revision, backend, dtype)).encode()
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def text_hash(text: str, prompt: str = "", owner: str | None = None) -> str:
    """The hash of a text as the model sees it (a prompt, when given, is part of it).

    With an `owner` (the tenant scope) the hash is the owner's alone: the owner
    is hashed with a tag no global hash has, so the two scopes never meet.
    """
    scoped = "" if owner is None else f"tenant\0{len(owner)}:{owner}\0"
    return hashlib.blake2b(f"{scoped}{prompt}\0{text}".encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class Cached:
    """One text's raw vector and token count."""

    vector: np.ndarray[Any, np.dtype[np.float32]]
    tokens: int


def pack(vector: np.ndarray[Any, np.dtype[np.float32]], tokens: int) -> bytes:
    """Token count (int32) then the float32 vector, little-endian."""
    return np.array([tokens], _TOKENS).tobytes() + vector.astype("<f4", copy=False).tobytes()


def unpack(raw: bytes) -> Cached:
    """The inverse of `pack`."""
    tokens = int(np.frombuffer(raw[:4], _TOKENS)[0])
    return Cached(np.frombuffer(raw[4:], "<f4").astype(np.float32), tokens)


class EmbeddingCache:
    """Look up and store raw vectors of one (model, revision, backend) in Redis."""

    def __init__(self, redis: RedisClient, keys: Keys, fingerprint: str, *,
                 ttl_s: int, max_entries: int, scope: str = "global") -> None:
        self.redis = redis
        self.keys = keys
        self.fingerprint = fingerprint
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.scope = scope

    def scoped(self, owner: str, text: str) -> Scoped:
        """(owner, text) as this cache's scope sees it: one owner under "global"."""
        return (owner if self.scope == "tenant" else "", text)

    def key(self, text: str, owner: str = "") -> str:
        """The entry key of one text of `owner`."""
        tenant = owner if self.scope == "tenant" else None
        return self.keys.cache_entry(self.fingerprint, text_hash(text, owner=tenant))

    async def lookup(self, texts: Sequence[str], owner: str = "") -> dict[str, Cached]:
        """The cached entries among `owner`'s `texts` (distinct texts expected)."""
        found = await self.lookup_scoped([self.scoped(owner, text) for text in texts])
        return {text: cached for (_, text), cached in found.items()}

    async def lookup_scoped(self, items: Sequence[Scoped], *,
                            count: bool = True) -> dict[Scoped, Cached]:
        """The cached entries among distinct (owner, text) pairs; counts hits and misses
        unless told not to (a lookup made ahead counts once it is settled: `count`)."""
        if not items:
            return {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for owner, text in items:
                    pipe.get(self.key(text, owner))
                replies = await pipe.execute()
        except RedisError:
            logger.warning("embedding cache unreadable; embedding everything", exc_info=True)
            return {}
        found = {item: unpack(raw) for item, raw in zip(items, replies, strict=True)
                 if raw is not None and len(raw) > 4}
        if count:
            await self.count(len(found), len(items) - len(found))
        return found

    async def store(self, entries: dict[str, Cached], owner: str = "") -> None:
        """Store new entries of `owner` (best effort), then hold the cache to its size cap."""
        await self.store_scoped({self.scoped(owner, text): c for text, c in entries.items()})

    async def store_scoped(self, entries: dict[Scoped, Cached]) -> None:
        """Store new entries by (owner, text) (best effort), then hold the cache to its cap."""
        if not entries:
            return
        now = time.time()
        names = {item: self.key(item[1], item[0]) for item in entries}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for item, cached in entries.items():
                    pipe.set(names[item], pack(cached.vector, cached.tokens), ex=self.ttl_s)
                pipe.zadd(self.keys.cache_index, {name: now for name in names.values()})
                pipe.zremrangebyscore(self.keys.cache_index, "-inf", now - self.ttl_s)
                pipe.zcard(self.keys.cache_index)
                replies = await pipe.execute(raise_on_error=False)
            size = replies[-1]
            if isinstance(size, int) and size > self.max_entries:
                await self._evict(size - self.max_entries)
        except RedisError:
            logger.warning("embedding cache write failed; carrying on without", exc_info=True)

    async def _evict(self, count: int) -> None:
        # ZPOPMIN is atomic, so two workers evicting at once pop different entries.
        popped = await self.redis.zpopmin(self.keys.cache_index, count)
        if popped:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, _ in popped:
                    pipe.delete(name)  # one key a command: entries live in many slots
                await pipe.execute()

    async def count(self, hits: int, misses: int) -> None:
        """Add to the hit and miss counters (best effort: `metrics.send`)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            metrics.count(pipe, self.keys, "cache_hits", hits)
            metrics.count(pipe, self.keys, "cache_misses", misses)
            await metrics.send(pipe)
