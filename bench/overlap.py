"""Redis behind the model: how much of a bulk job's time the model is idle.

One in-process worker on the default backend (ONNX fp32, cache off) embeds
the first 4,000 unique STS-B sentences, submitted as one job, with Redis
work overlapping the model's (the default: each batch's commit runs while
the model embeds the next, and the next is read during the last model call
of the one before) and in line (read, embed, commit: the order before).
Each round runs both, in alternating order; a fresh job each time. Prints,
per mode, texts/s and the share of the job's time in which no model call
was running, beside the in-line baseline. Asserts nothing.

    .venv/bin/python bench/overlap.py [--texts 4000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from table import EXPORTS, sentences  # noqa: E402

from pipeline.inputs import Item, JobOptions  # noqa: E402
from pipeline.model.info import bundled_model_dir  # noqa: E402
from pipeline.model.loading import load_embedder  # noqa: E402
from pipeline.service import Pipeline  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.store.embedded import EmbeddedRedis  # noqa: E402
from workers.worker import Worker  # noqa: E402


class Timed:
    """Wraps an embedder; adds up the wall time in which a model call ran."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.info = inner.info
        self.revision = getattr(inner, "revision", None)
        self.busy_s = 0.0
        self._lock = threading.Lock()

    def embed(self, texts: Any) -> Any:
        started = time.perf_counter()
        try:
            return self.inner.embed(texts)
        finally:
            with self._lock:
                self.busy_s += time.perf_counter() - started


async def one_job(settings: Settings, embedder: Timed, texts: list[str], behind: bool
                  ) -> tuple[float, float]:
    """(texts/s, share of the job's time with no model call running)."""
    async with Worker.start(settings, embedder) as worker:
        worker.overlap = behind
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(worker.run(stop, ready))
        await ready.wait()
        pipeline = Pipeline(settings)
        try:
            embedder.busy_s = 0.0
            started = time.perf_counter()
            job = await pipeline.submit([Item(t) for t in texts], JobOptions())
            async for event in pipeline.follow(job.id):
                if event.name == "end":
                    break
            wall = time.perf_counter() - started
        finally:
            stop.set()
            await task
            await pipeline.close()
    return len(texts) / wall, 1 - embedder.busy_s / wall


async def measure(args: argparse.Namespace, url: str, data: Path) -> None:
    settings = Settings(redis_url=url, data_dir=data, model=str(bundled_model_dir()),
                        backend="onnx", cache=False, export_dir=EXPORTS)
    embedder = Timed(load_embedder(settings))
    pool = sentences()
    texts = pool[:args.texts]
    await one_job(settings, embedder, pool[4000:5000], True)  # run in
    results: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for round_number in range(args.rounds):
        order = (False, True) if round_number % 2 == 0 else (True, False)
        for behind in order:
            # A new suffix each job: the same texts, never the same job.
            numbered = [f"{t} ({round_number}{int(behind)})" for t in texts]
            rate, idle = await one_job(settings, embedder, numbered, behind)
            results[behind].append((rate, idle))
            print(f"round {round_number + 1} {'behind' if behind else 'in line'}: "
                  f"{rate:.0f} texts/s, model idle {idle:.1%}", flush=True)
    # Medians: this machine's speed drifts by 20-30% between jobs, and the idle
    # share, a ratio within one job, is the steadier figure.
    rate = {mode: statistics.median(r for r, _ in runs) for mode, runs in results.items()}
    idle = {mode: statistics.median(i for _, i in runs) for mode, runs in results.items()}
    print(f"\n| Redis work | texts/s (median of {args.rounds}) | model idle (median) | ratio |")
    print("|---|---|---|---|")
    for mode, label in ((False, "in line (baseline)"), (True, "overlapping the model")):
        print(f"| {label} | {rate[mode]:.0f} | {idle[mode]:.1%} | "
              f"{rate[mode] / rate[False]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, \
            EmbeddedRedis(Path(folder) / "redis") as server:
        asyncio.run(measure(args, server.url, Path(folder) / "data"))


if __name__ == "__main__":
    main()
