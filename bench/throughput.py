"""Pipeline throughput against a direct SentenceTransformer.encode baseline.

Starts an embedded Valkey, one worker process and the server, submits the
STS-B train sentences as one job over REST and reads every result over SSE;
the baseline encodes the same texts directly in this process, with the
worker idle. Both figures come from the same run on the same machine:
compare the ratio, not the absolute numbers.

    .venv/bin/python bench/throughput.py [--texts 3000] [--workers 1]
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.model.info import bundled_model_dir  # noqa: E402
from pipeline.store.embedded import EmbeddedRedis  # noqa: E402
from tests.support.processes import start_server, start_worker, wait_for_workers  # noqa: E402
from tests.support.sse_client import read_events  # noqa: E402

STS = ROOT / "tests" / "data" / "stsbenchmark" / "sts-train.csv"


def sentences(count: int) -> list[str]:
    texts: list[str] = []
    with STS.open(encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            texts += [row[5], row[6]]
    return texts[:count]


def direct(texts: list[str], model: Any) -> float:
    started = time.perf_counter()
    model.encode(texts, batch_size=32)
    return len(texts) / (time.perf_counter() - started)


def through_pipeline(
    texts: list[str], workers: int, root: Path, encoding: str
) -> tuple[float, float]:
    with EmbeddedRedis(root / "redis") as redis_server:
        procs = [start_worker(redis_server.url, root, str(i)) for i in range(workers)]
        server, base = start_server(redis_server.url, root)
        procs.append(server)
        try:
            wait_for_workers(base, workers)
            warm = httpx.post(f"{base}/v1/jobs", json={"inputs": texts[:64]}).json()["id"]
            with httpx.stream("GET", f"{base}/v1/jobs/{warm}/events", timeout=120) as r:
                list(read_events(r))
            started = time.perf_counter()
            reply = httpx.post(f"{base}/v1/jobs", json={"inputs": texts}, timeout=60)
            job_id = reply.json()["id"]
            first = None
            count = 0
            with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events",
                              params={"encoding": encoding},
                              timeout=httpx.Timeout(10, read=600)) as response:
                for event in read_events(response):
                    if event.event == "result":
                        first = first or time.perf_counter() - started
                        count += len(event.data)
            elapsed = time.perf_counter() - started
            assert count == len(texts), f"got {count} of {len(texts)} results"
            return len(texts) / elapsed, first or 0.0
        finally:
            for proc in procs:
                proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--encoding", choices=["float", "base64"], default="float",
                        help="how the SSE stream carries vectors")
    args = parser.parse_args()
    texts = sentences(args.texts)
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    model.encode(texts[:64])
    before = direct(texts, model)
    with tempfile.TemporaryDirectory() as tmp:
        pipeline_rate, first_s = through_pipeline(texts, args.workers, Path(tmp), args.encoding)
    after = direct(texts, model)
    baseline = (before + after) / 2
    print(f"texts:                 {len(texts)} STS-B train sentences")
    print(f"direct encode:         {baseline:8.1f} texts/s  (baseline: mean of {before:.1f} "
          f"before and {after:.1f} after, same run)")
    print(f"pipeline REST+SSE:     {pipeline_rate:8.1f} texts/s  ({args.workers} worker(s), "
          f"{args.encoding} vectors)")
    print(f"ratio pipeline/direct: {pipeline_rate / baseline:8.3f}")
    print(f"first result after:    {first_s * 1000:8.0f} ms")


if __name__ == "__main__":
    main()
