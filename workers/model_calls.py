"""Model calls: which texts the worker hands the model, in what groups, and when.

What a claimed batch of chunks costs the model:

- each distinct text is embedded once, however many chunks or jobs carry it;
- texts the shared cache holds (`workers.cache`) are not embedded at all; under
  the tenant scope an entry answers only its owner's texts, and a text any
  owner in the batch missed is embedded (once) for all of them;
- the cache is written behind the model: a batch's store runs while the next
  batch is claimed and embedded, after the store before it, and at most
  `STORES_IN_FLIGHT` run at once. A batch read ahead was looked up in the
  cache while the model embedded the one before (`look_up`), before the
  stores then in flight could land: the entries of the last stores that may
  be (`STORES_KEPT`) are kept in memory and answer what the lookup missed,
  so a text of one batch repeated in the next is still embedded once. A
  batch not read ahead is looked up after this worker's stores have landed;
- the rest are sorted by length and cut into model calls by padded tokens
  (estimated from the text's length, capped at the model's limit) as well as
  by count, so one long text never pads a call of short ones, and every call
  is short enough that the fast lane waits at most about one call;
- between two model calls `between_calls` runs: the worker serves the fast
  lane there, so an interactive request never waits for a whole bulk batch;
- while interactive requests are arriving (`busy()` says so: the worker
  served one in the last `BUSY_S` seconds), bulk calls are cut to a quarter
  of the budgets (`BUSY_CUT`), so a request waits about a quarter as long
  for the call in hand. Each call is cut when it is due, so a batch begun in
  a quiet spell cuts finer from the first request on. Bulk throughput pays
  for it only meanwhile (see `bench/table.py`);
- the requests' own calls are half the budgets (`REQUEST_CUT`), busy or not:
  a bulk call holds neighbours of a long length-sorted claim, but a request's
  texts are as varied as its caller sent them, and one call of 32 pads every
  row to the longest (`bench/call_sizes.py`, requests);
- a call that fails is retried text by text, so a poison input fails alone
  (as data, on every chunk that carries it) and every other text still gets
  its vector.

The unit is the model text (`Work.planned`): the prompted text, or one window
(or chunk) of a long text, so windows are batched, deduplicated and cached like any
other text, and the cache key covers the prompt because the text carries it.
Late chunking is the exception: a chunk's vector depends on its window, not
its text alone, so a late-chunked job's inputs are pooled from their windows'
token embeddings, one queue chunk at a time, and never cached.
Vectors stay raw (model output) here; `workers.batch.chunk_result` applies
each job's `dimensions` and `normalize`, so cached vectors serve any options.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import cancel_and_wait, tracing
from pipeline.model import Embedded, pool_late, window_texts
from workers.cache import Cached

if TYPE_CHECKING:
    from pipeline.model import Embedder, Plan
    from workers.cache import EmbeddingCache, Scoped
    from workers.work import Work

logger = logging.getLogger(__name__)

BetweenCalls = Callable[[], Awaitable[None]]
BUSY_S = 1.0
STORES_IN_FLIGHT = 2
# A lookup read ahead precedes the stores in flight then, and the store of the batch
# the model is embedding: those are the stores whose entries it may have missed.
STORES_KEPT = STORES_IN_FLIGHT + 1
BUSY_CUT = 4
# 120 requests of 32 random STS-B sentences (openvino-bf16): 351-405 texts/s in calls
# of 32 texts / 2,048 tokens, 528-538 in calls of 16 / 1,024, 477-488 cut where a
# text is 1.5 times the first one's length (four times the calls); bulk claims of
# 256 ran faster in calls of 32 (829-943 against 760-899).
REQUEST_CUT = 2
CHARS_PER_TOKEN = 4  # a word piece is about four characters of English
SPECIAL_TOKENS = 2


class ModelThread:
    """Runs an embedder's calls off the event loop, always on the same one thread.

    Not on `asyncio.to_thread`'s pool, which hands successive calls to
    whichever of its threads is free: the torch backend ran a bulk job at
    0.80 and 0.81 of `encode()` that way and at 0.86 and 0.83 on one thread,
    measured in turn in one run (4,000 STS-B sentences, REST to SSE).
    """

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="model")

    async def embed(self, texts: Sequence[str]) -> Embedded:
        """Embed `texts` on the model's thread."""
        loop = asyncio.get_running_loop()
        with tracing.span("model.call", {"embedstream.texts": len(texts)}):
            return await loop.run_in_executor(self._thread, self.embedder.embed, texts)

    async def embed_plan(self, plan: Plan) -> Embedded:
        """A plan's raw rows: its texts embedded, or for late chunking its chunks pooled."""
        if not plan.windows:
            return await self.embed(plan.texts)
        embed_tokens = getattr(self.embedder, "embed_tokens", None)
        if embed_tokens is None:
            raise LateChunkingUnsupported(
                f"the {self.embedder.info.backend or 'loaded'} backend gives no token "
                "embeddings, so it cannot do chunking=late; use chunking=separate or a "
                "worker on the torch backend")
        texts = window_texts(plan)
        loop = asyncio.get_running_loop()
        with tracing.span("model.call", {"embedstream.texts": len(texts)}):
            outputs = await loop.run_in_executor(self._thread, embed_tokens, texts)
        return pool_late(plan, outputs, self.embedder.info.dimensions)


class LateChunkingUnsupported(RuntimeError):
    """The worker's backend cannot give token embeddings (failed inputs, as data)."""


class ModelCalls:
    """Embeds the texts of claimed chunks: deduplicated, cached, in token-budget calls."""

    def __init__(self, embedder: Embedder, cache: EmbeddingCache | None, *,
                 max_texts: int, max_tokens: int,
                 busy: Callable[[], bool] = lambda: False) -> None:
        self.embedder = embedder
        self.model = ModelThread(embedder)
        self.cache = cache
        self.max_texts = max_texts
        self.max_tokens = max_tokens
        self.busy = busy
        self._storing: collections.deque[asyncio.Task[None]] = collections.deque()
        self._stores: collections.deque[dict[Scoped, Cached]] = collections.deque(
            maxlen=STORES_KEPT)

    async def look_up(self, work: list[Work]) -> dict[Scoped, Cached]:
        """What the cache holds for `work`'s texts, asked ahead of `embed` (see above)."""
        if self.cache is None:
            return {}
        # Not counted yet: the entries of the stores landing meanwhile may answer a miss.
        return await self.cache.lookup_scoped(self._distinct(self._pooled(work))[1],
                                              count=False)

    async def embed(self, work: list[Work], between_calls: BetweenCalls | None = None,
                    found: dict[Scoped, Cached] | None = None) -> None:
        """Fill each chunk's raw vectors, token counts and per-input errors; `found`: the
        cache's answers from `look_up`, else the cache is read here."""
        for item in work:
            if item.planned(self.embedder.info).windows:
                await self._embed_late(item)
        work = self._pooled(work)
        if not work:
            return
        plans = [item.planned(self.embedder.info) for item in work]
        wanted, distinct = self._distinct(work)
        ahead = found is not None
        if found is None:
            await self.stored()  # this worker's stores land before this lookup
            found = await self.cache.lookup_scoped(distinct) if self.cache is not None else {}
        else:  # read ahead, perhaps before the last stores landed: they answer too
            found = dict(found)
            for stored in self._stores:
                found.update((pair, stored[pair]) for pair in distinct
                             if pair not in found and pair in stored)
        # A text one owner missed is embedded even if another owner's entry holds it:
        # the miss costs its owner a model call whoever else embedded the text.
        missing = list(dict.fromkeys(pair[1] for pair in distinct if pair not in found))
        made, errors = await self._compute(missing, between_calls)
        if self.cache is not None:
            new = {pair: made[pair[1]] for pair in distinct
                   if pair not in found and pair[1] in made and usable(made[pair[1]].vector)}
            # A lookup made ahead is counted here, memory's answers as hits.
            counts = (len(found), len(distinct) - len(found)) if ahead else None
            await self._store_behind(new, counts)
        blank = Cached(np.zeros(self._dimensions(found, made), np.float32), 0)
        for item, plan, pairs in zip(work, plans, wanted, strict=True):
            picked = [found.get(pair) or made.get(pair[1], blank) for pair in pairs]
            item.take(plan, Embedded(np.vstack([c.vector for c in picked]),
                                     np.array([c.tokens for c in picked], np.int64)))
            for i, (start, size) in enumerate(zip(plan.starts, plan.sizes, strict=True)):
                failed = [errors[t] for t in plan.texts[start:start + size] if t in errors]
                if failed:  # one failed window fails its input
                    item.errors[i] = failed[0]

    def _pooled(self, work: list[Work]) -> list[Work]:
        """The chunks embedded text by text (all but the late-chunked)."""
        return [item for item in work if not item.planned(self.embedder.info).windows]

    def _distinct(self, work: list[Work]) -> tuple[list[list[Scoped]], list[Scoped]]:
        """Each chunk's (owner, text) pairs, and every distinct pair of them."""
        scoped = self.cache.scoped if self.cache is not None else _unscoped
        wanted = [[scoped(item.owner, text) for text in item.planned(self.embedder.info).texts]
                  for item in work]
        return wanted, list(dict.fromkeys(pair for pairs in wanted for pair in pairs))

    async def _store_behind(self, entries: dict[Scoped, Cached],
                            counts: tuple[int, int] | None = None) -> None:
        """Store `entries` (and add `counts`, hits and misses, to the counters) in a task,
        after the store before it (best effort, and off the model's path: one round trip
        or two a batch)."""
        assert self.cache is not None
        while len(self._storing) >= STORES_IN_FLIGHT:
            await self._storing.popleft()
        self._stores.append(entries)
        before = self._storing[-1] if self._storing else None
        store = functools.partial(_count_and_store, self.cache, entries, counts)
        self._storing.append(asyncio.create_task(_after(before, store)))

    async def stored(self) -> None:
        """Wait for the cache stores in flight (they log their own failures)."""
        while self._storing:
            await self._storing.popleft()

    async def cancel(self) -> None:
        """Stop the cache stores still in flight (the worker is leaving)."""
        while self._storing:
            await cancel_and_wait(self._storing.popleft())

    async def _embed_late(self, item: Work) -> None:
        """A late-chunked chunk of inputs: all at once, or input by input if that fails."""
        plan = item.planned(self.embedder.info)
        try:
            item.take(plan, await self.model.embed_plan(plan))
            return
        except LateChunkingUnsupported as exc:  # every input would fail alike: say so once
            item.errors.update(dict.fromkeys(range(len(plan.sizes)), str(exc)))
            item.take(plan, Embedded(
                np.zeros((len(plan.spans), self.embedder.info.dimensions), np.float32),
                np.zeros(len(plan.spans), np.int64)))
            return
        except Exception:
            logger.exception("late chunking of %d inputs failed; retrying input by input",
                             len(plan.sizes))
        parts = []
        for i, size in enumerate(plan.sizes):
            try:
                parts.append(await self.model.embed_plan(plan.part(i)))
            except Exception as exc:
                logger.exception("late chunking of an input failed")
                item.errors[i] = f"embedding failed: {type(exc).__name__}: {exc}"[:500]
                parts.append(Embedded(
                    np.zeros((size, self.embedder.info.dimensions), np.float32),
                    np.zeros(size, np.int64)))
        item.take(plan, Embedded(np.vstack([p.vectors for p in parts]),
                                 np.concatenate([p.token_counts for p in parts])))

    def _dimensions(self, *rows: dict[Any, Cached]) -> int:
        for cached in (c for found in rows for c in found.values()):
            return len(cached.vector)
        return self.embedder.info.dimensions

    def calls(self, texts: Sequence[str]) -> list[list[str]]:
        """Length-sorted groups of texts, each within the call's token and text budgets."""
        ordered = sorted(texts, key=len)
        groups: list[list[str]] = []
        while ordered:
            groups.append(self._next_call(ordered, self.max_texts, self.max_tokens))
            ordered = ordered[len(groups[-1]):]
        return groups

    def _next_call(self, ordered: Sequence[str], max_texts: int, max_tokens: int) -> list[str]:
        """The first texts of length-sorted `ordered` that fit in one call's budgets."""
        limit = self.embedder.info.max_seq_length
        group = [ordered[0]]
        for text in ordered[1:max_texts]:
            tokens = min(limit, len(text) // CHARS_PER_TOKEN + SPECIAL_TOKENS)
            # Sorted ascending, so the newest text is the longest: it sets the padding.
            if (len(group) + 1) * tokens > max_tokens:
                break
            group.append(text)
        return group

    async def _compute(
        self, texts: list[str], between_calls: BetweenCalls | None
    ) -> tuple[dict[str, Cached], dict[str, str]]:
        made: dict[str, Cached] = {}
        errors: dict[str, str] = {}
        ordered = sorted(texts, key=len)
        while ordered:
            if len(ordered) < len(texts) and between_calls is not None:
                await between_calls()
            # Bulk work, which the fast lane can interrupt, is cut finer while requests
            # come in; the requests' own calls are cut for padding, not for waiting.
            busy_cut = BUSY_CUT if self.busy() else 1
            cut = REQUEST_CUT if between_calls is None else busy_cut
            group = self._next_call(ordered, max(1, self.max_texts // cut),
                                    max(1, self.max_tokens // cut))
            ordered = ordered[len(group):]
            await self._call(group, made, errors)
        return made, errors

    async def _call(self, texts: list[str], made: dict[str, Cached],
                    errors: dict[str, str]) -> None:
        try:
            embedded = await self.model.embed(texts)
        except Exception:
            # Even a call of one text goes on to be retried alone, which records
            # the failure on that text: re-raising would leave the entry pending,
            # to be redelivered until given up on with a misleading reason.
            logger.exception("model call of %d texts failed; retrying text by text", len(texts))
            for text in texts:
                await self._alone(text, made, errors)
            return
        for i, text in enumerate(texts):
            made[text] = Cached(embedded.vectors[i], int(embedded.token_counts[i]))

    async def _alone(self, text: str, made: dict[str, Cached], errors: dict[str, str]) -> None:
        try:
            embedded = await self.model.embed([text])
        except Exception as exc:
            logger.exception("an input failed alone")
            errors[text] = f"embedding failed: {type(exc).__name__}: {exc}"[:500]
            return
        made[text] = Cached(embedded.vectors[0], int(embedded.token_counts[0]))


async def _after(before: asyncio.Task[None] | None,
                 then: Callable[[], Awaitable[None]]) -> None:
    """Run `then` once `before` is over, whatever became of it."""
    if before is not None:
        await asyncio.wait({before})
    await then()


async def _count_and_store(cache: EmbeddingCache, entries: dict[Scoped, Cached],
                           counts: tuple[int, int] | None) -> None:
    if counts is not None:
        await cache.count(*counts)
    await cache.store_scoped(entries)


def _unscoped(owner: str, text: str) -> tuple[str, str]:
    """Without a cache, owners do not matter: a text is embedded once for all of them."""
    return ("", text)


def usable(vector: np.ndarray[Any, np.dtype[np.float32]]) -> bool:
    """Whether a raw vector may be cached (a non-finite one is an error, not a result)."""
    return bool(np.isfinite(vector).all())
