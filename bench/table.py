"""The benchmark table: every figure of issue 8 beside its baseline, from one run.

Runs from a plain clone: the texts are the first 4,000 unique sentences of
the STS-B train split that the tests carry (`tests/data/stsbenchmark/`), the
quality figure is STS-B dev Spearman. It starts an embedded Valkey, the
server, and one worker at a time (onnx, torch, onnx-int8: the worker under
test is the only one running), and measures the raw baseline
(`SentenceTransformer.encode` in this process, batch 32, the worker idle)
before and after, on the same texts. Compare ratios, not absolute figures:
the machine may be shared. Prints one table; asserts nothing.

    .venv/bin/python bench/table.py [--texts 4000] [--backlog 12000] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from processes import Process, start_server, start_worker, wait_for_workers  # noqa: E402
from sse_client import read_events  # noqa: E402

from pipeline.embedded import EmbeddedRedis  # noqa: E402
from pipeline.models import bundled_model_dir  # noqa: E402

STS = ROOT / "tests" / "data" / "stsbenchmark"
EXPORTS = ROOT / ".embedstream" / "onnx"
Row = tuple[str, str, str, str, str]


def sentences() -> list[str]:
    texts: list[str] = []
    for split in ("train", "dev"):
        with (STS / f"sts-{split}.csv").open(encoding="utf-8") as handle:
            for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
                texts += [row[5], row[6]]
    return list(dict.fromkeys(texts))


def dev_pairs() -> tuple[list[str], list[str], list[float]]:
    first, second, gold = [], [], []
    with (STS / "sts-dev.csv").open(encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            first.append(row[5])
            second.append(row[6])
            gold.append(float(row[4]))
    return first, second, gold


class Raw:
    """The bare model in this process: the baseline of every ratio."""

    def __init__(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(bundled_model_dir()), device="cpu")
        self.model.encode(["warm up"] * 64)

    def rate(self, texts: list[str]) -> float:
        started = time.perf_counter()
        self.model.encode(texts, batch_size=32)
        return len(texts) / (time.perf_counter() - started)

    def one_text_p50_ms(self, texts: list[str]) -> float:
        times = []
        for text in texts:
            started = time.perf_counter()
            self.model.encode([text])
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000


@contextmanager
def worker(redis_url: str, root: Path, base: str, backend: str, cache: bool) -> Iterator[Process]:
    proc = start_worker(redis_url, root, f"{backend}-{cache}", EMBEDSTREAM_BACKEND=backend,
                        EMBEDSTREAM_CACHE="on" if cache else "off",
                        EMBEDSTREAM_EXPORT_DIR=str(EXPORTS))
    try:
        wait_for_workers(base, 1, timeout_s=600)
        warm(base)
        yield proc
    finally:
        proc.stop()
        wait_gone(base)


def wait_gone(base: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(f"{base}/readyz", timeout=5).json().get("workers", 0) == 0:
            return
        time.sleep(0.1)


def warm(base: str) -> None:
    bulk(base, [f"warm-up text {i}" for i in range(96)])
    for i in range(5):
        httpx.post(f"{base}/v1/embeddings", json={"input": f"warm-up query {i}"}, timeout=60)


def bulk(base: str, texts: list[str]) -> float:
    """Seconds from POST /v1/jobs to the last result read over SSE (base64 vectors)."""
    started = time.perf_counter()
    reply = httpx.post(f"{base}/v1/jobs", json={"inputs": texts}, timeout=120)
    job_id = reply.json()["id"]
    count = 0
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", params={"encoding": "base64"},
                      timeout=httpx.Timeout(10, read=900)) as response:
        for event in read_events(response):
            if event.event == "result":
                count += len(event.data)
    if count != len(texts):
        print(f"warning: got {count} of {len(texts)} results", file=sys.stderr)
    return time.perf_counter() - started


def one_text_p50_ms(base: str, texts: list[str]) -> float:
    times = []
    with httpx.Client(timeout=60) as client:
        for text in texts:
            started = time.perf_counter()
            client.post(f"{base}/v1/embeddings", json={"input": text})
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def concurrent_rate(base: str, texts: list[str], clients: int) -> float:
    """Texts/s with `clients` concurrent 1-text /v1/embeddings callers."""
    queue = list(reversed(texts))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient) -> None:
        while queue:
            text = queue.pop()
            await client.post(f"{base}/v1/embeddings", json={"input": text})

    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        return len(texts) / (time.perf_counter() - started)


def behind_backlog_p50_ms(base: str, backlog: list[str], probes: list[str]) -> float:
    """1-text p50 while a `backlog`-text job waits in the bulk lane (cancelled after)."""
    job_id = httpx.post(f"{base}/v1/jobs", json={"inputs": backlog}, timeout=300).json()["id"]
    try:
        time.sleep(1.0)  # let the worker get into the backlog
        return one_text_p50_ms(base, probes)
    finally:
        httpx.delete(f"{base}/v1/jobs/{job_id}", timeout=30)


def with_subscribers(base: str, texts: list[str], subscribers: int) -> float:
    stop = threading.Event()
    opened = threading.Semaphore(0)

    def subscribe() -> None:
        with httpx.stream("GET", f"{base}/v1/events",
                          timeout=httpx.Timeout(10, read=None)) as response:
            opened.release()
            for _ in response.iter_lines():
                if stop.is_set():
                    return

    threads = [threading.Thread(target=subscribe, daemon=True) for _ in range(subscribers)]
    for thread in threads:
        thread.start()
    for _ in threads:
        opened.acquire(timeout=30)
    try:
        return bulk(base, texts)
    finally:
        stop.set()


def rss_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def sts_quality() -> tuple[float, float, float]:
    """STS-B dev Spearman for onnx fp32 and int8, and their mean cosine to each other."""
    from pipeline.embedder import load_embedder
    from pipeline.settings import Settings

    first, second, gold = dev_pairs()
    scores = {}
    vectors = {}
    for backend in ("onnx", "onnx-int8"):
        embedder = load_embedder(Settings(backend=backend, device="cpu", export_dir=EXPORTS))
        a, b = embedder.embed(first).vectors, embedder.embed(second).vectors
        scores[backend] = spearman((a * b).sum(1), np.array(gold))
        vectors[backend] = a
    mean_cos = float((vectors["onnx"] * vectors["onnx-int8"]).sum(1).mean())
    return scores["onnx"], scores["onnx-int8"], mean_cos


def measure(args: argparse.Namespace, raw: Raw, texts: list[str], root: Path) -> list[Row]:
    rows: list[Row] = []
    everything = sentences()
    probes = [f"probe query number {i}: {t}" for i, t in enumerate(everything[-60:])]
    raw_rate = raw.rate(texts)
    raw_p50 = raw.one_text_p50_ms(probes[:40])
    backlog = (everything * 2)[:args.backlog]
    with EmbeddedRedis(root / "redis") as redis_server:
        server, base = start_server(redis_server.url, root)
        try:
            rates = {}
            for backend in ("onnx", "torch", "onnx-int8"):
                with worker(redis_server.url, root, base, backend, cache=False):
                    rates[backend] = len(texts) / bulk(base, texts)
                    if backend == "onnx":
                        idle_p50 = one_text_p50_ms(base, probes[:40])
                        conc = asyncio.run(concurrent_rate(
                            base, [f"{i} {t}" for i, t in enumerate(texts[:1000])],
                            args.clients))
                        subs = len(texts) / with_subscribers(base, texts, args.subscribers)
                        busy_p50 = behind_backlog_p50_ms(base, backlog, probes[40:60])
            with worker(redis_server.url, root, base, "onnx", cache=True) as cached:
                fresh = [f"cache run: {t}" for t in texts]
                first_s = bulk(base, fresh)
                again_s = bulk(base, fresh)
                worker_rss = rss_mb(cached.popen.pid)
            server_rss = rss_mb(server.popen.pid)
        finally:
            server.stop()
    fp32_rho, int8_rho, int8_cos = sts_quality()
    after = raw.rate(texts)
    base_rate = (raw_rate + after) / 2
    rows += [
        ("raw SentenceTransformer.encode", f"{base_rate:.0f} texts/s",
         f"{raw_rate:.0f} before, {after:.0f} after", "", ""),
        ("bulk REST->SSE, onnx fp32 / raw", f"{rates['onnx']:.0f} texts/s",
         f"{base_rate:.0f} texts/s", f"{rates['onnx'] / base_rate:.2f}", ">= 1.15"),
        ("bulk, torch / raw", f"{rates['torch']:.0f} texts/s", f"{base_rate:.0f} texts/s",
         f"{rates['torch'] / base_rate:.2f}", ">= 0.90"),
        ("bulk, onnx-int8 / raw", f"{rates['onnx-int8']:.0f} texts/s",
         f"{base_rate:.0f} texts/s", f"{rates['onnx-int8'] / base_rate:.2f}", ">= 2.0"),
        ("  STS-B dev Spearman int8 vs fp32", f"{int8_rho:.4f}", f"{fp32_rho:.4f}",
         f"{int8_rho - fp32_rho:+.4f} (cos {int8_cos:.3f})", "within 0.005"),
        (f"{args.clients} concurrent 1-text clients / raw", f"{conc:.0f} texts/s",
         f"{base_rate:.0f} texts/s", f"{conc / base_rate:.2f}", ">= 0.60"),
        ("1-text /v1/embeddings p50 - raw p50", f"{idle_p50:.1f} ms", f"{raw_p50:.1f} ms",
         f"{idle_p50 - raw_p50:+.1f} ms", "<= 5 ms"),
        (f"1-text p50 behind {args.backlog} texts / idle", f"{busy_p50:.1f} ms",
         f"{idle_p50:.1f} ms", f"{busy_p50 / idle_p50:.2f}", "<= 3"),
        (f"same {len(texts)} texts again / first", f"{again_s:.2f} s", f"{first_s:.2f} s",
         f"{again_s / first_s:.3f}", "<= 0.10"),
        (f"bulk with {args.subscribers} feed subscribers / without", f"{subs:.0f} texts/s",
         f"{rates['onnx']:.0f} texts/s", f"{subs / rates['onnx']:.2f}", ">= 0.90"),
        ("server RSS / worker RSS (peak)", f"{server_rss:.0f} MB", f"{worker_rss:.0f} MB",
         "", "<= 250 MB / <= 1.2 GB"),
    ]
    return rows


def show(rows: list[Row]) -> None:
    header = ("figure", "measured", "baseline", "ratio", "target")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(5)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--backlog", type=int, default=12000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--subscribers", type=int, default=100)
    args = parser.parse_args()
    texts = sentences()[:args.texts]
    load = os.getloadavg()
    raw = Raw()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args, raw, texts, Path(tmp))
    print(f"{len(texts)} STS-B sentences, {os.cpu_count()} cores, load average "
          f"{load[0]:.2f} at the start and {os.getloadavg()[0]:.2f} at the end")
    show(rows)


if __name__ == "__main__":
    main()
