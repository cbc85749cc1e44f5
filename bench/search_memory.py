"""search_job's memory: the paged top-k scan against reading the whole job at once.

Writes a synthetic completed job of `--inputs` random 384-float vectors into
an embedded Valkey of its own, then measures the peak Python allocation
(tracemalloc) of `results.nearest` (what search_job runs: 64 chunks a page,
the best top_k kept) and, as the baseline, of one HGETALL of the job's
vectors (what search_job did before). Prints both; asserts nothing.

    .venv/bin/python bench/search_memory.py --inputs 200000
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.jobs import results
from pipeline.jobs.record import JobRecord, JobStatus
from pipeline.keys import Keys
from pipeline.store.connections import RedisClient, connect
from pipeline.store.embedded import EmbeddedRedis

CHUNK, DIMS, JOB = 32, 384, "ab" * 16


async def write_job(redis: RedisClient, keys: Keys, inputs: int) -> JobRecord:
    """Store `inputs` random vectors as committed chunks; the job's record."""
    rng = np.random.default_rng(0)
    chunks = inputs // CHUNK
    meta = orjson.dumps({"n": CHUNK, "dims": DIMS})
    for start in range(0, chunks, 500):
        async with redis.pipeline(transaction=False) as pipe:
            for c in range(start, min(start + 500, chunks)):
                vectors = rng.standard_normal((CHUNK, DIMS)).astype("<f4").tobytes()
                pipe.hset(keys.vectors(JOB), mapping={f"v:{c}": vectors, f"m:{c}": meta})
            await pipe.execute()
    return JobRecord(id=JOB, status=JobStatus.COMPLETED, total=chunks * CHUNK, model="m",
                     dimensions=DIMS, model_dimensions=DIMS, normalize=True, truncate=True,
                     chunk_size=CHUNK, chunks=chunks, lane="bulk", created_at="",
                     created_ts=0.0)


async def measure(url: str, inputs: int) -> None:
    redis, keys = connect(url), Keys("es")
    record = await write_job(redis, keys, inputs)
    query = np.random.default_rng(1).standard_normal(DIMS).astype(np.float32)
    tracemalloc.start()
    started = time.perf_counter()
    await results.nearest(redis, keys, record, query, 10)
    paged_s = time.perf_counter() - started
    paged_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    started = time.perf_counter()
    whole = await redis.hgetall(keys.vectors(JOB))
    whole_s = time.perf_counter() - started
    whole_peak = tracemalloc.get_traced_memory()[1]
    del whole
    await redis.aclose()
    print(f"job:                       {record.total} inputs, "
          f"{record.total * DIMS * 4 / 1e6:.0f} MB of float32 vectors")
    print(f"paged top-10 scan:         peak {paged_peak / 1e6:7.1f} MB, {paged_s:.2f} s")
    print(f"baseline, one HGETALL:     peak {whole_peak / 1e6:7.1f} MB, {whole_s:.2f} s "
          "(before scoring anything)")
    print(f"ratio paged/baseline:      {paged_peak / whole_peak:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, \
            EmbeddedRedis(Path(folder), binary="valkey") as server:
        asyncio.run(measure(server.url, args.inputs))


if __name__ == "__main__":
    main()
