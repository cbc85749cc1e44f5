"""What waiting for a replica costs (`EMBEDSTREAM_WAIT_REPLICAS`).

Starts a Valkey primary with one replica on loopback, and runs the same job through a
`Pipeline` and one in-process worker twice in turn per round: with the default (-1: every
commit waits for the replica before its entries are acked, every submission before it is
answered) and with 0 (no wait). Prints texts/s of each and the ratio, for the real model
(`--backend onnx`, what `embedstream up` runs) or the fake embedder (`--backend fake`,
the pipeline's own cost laid bare). Between machines, add the network round trip between
primary and replica to each wait.

    .venv/bin/python bench/replica_wait.py [--texts 2000] [--rounds 3] [--backend onnx|fake]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.model import load_embedder  # noqa: E402
from pipeline.service import Pipeline  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from pipeline.store.server_files import find_server_binary  # noqa: E402
from tests.support.fakes import HashEmbedder  # noqa: E402
from tests.support.processes import free_port  # noqa: E402
from tests.support.sts_data import STS_TRAIN  # noqa: E402
from tests.support.workers import running, submit, wait_end  # noqa: E402


def sts_sentences(count: int) -> list[str]:
    """The first `count` distinct sentences of STS-B train."""
    texts: dict[str, None] = {}
    with STS_TRAIN.open(encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            texts.update(dict.fromkeys(row[5:7]))
    return list(texts)[:count]


def start_pair(root: Path) -> tuple[list[subprocess.Popen[bytes]], str]:
    binary = find_server_binary("valkey")
    primary, replica = free_port(), free_port()
    processes = []
    for port, extra in ((primary, []), (replica, ["--replicaof", "127.0.0.1", str(primary)])):
        (root / str(port)).mkdir()
        processes.append(subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root / str(port)),
             "--save", "", "--appendonly", "no", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    client = redis.Redis(port=primary)
    for _ in range(400):
        try:
            client.set("probe", 1)
            if client.execute_command("WAIT", 1, 100) == 1:
                break
        except redis.ConnectionError:
            pass
        time.sleep(0.05)
    return processes, f"redis://127.0.0.1:{primary}/0"


async def one_run(settings: Settings, embedder: object, texts: list[str]) -> float:
    pipeline = Pipeline(settings)
    try:
        async with running(settings, embedder):
            started = time.perf_counter()
            job_id = await submit(pipeline, texts)
            end = await wait_end(pipeline, job_id, timeout_s=600)
            elapsed = time.perf_counter() - started
        assert end["status"] == "completed", end
    finally:
        await pipeline.close()
    return len(texts) / elapsed


async def main(count: int, rounds: int, backend: str) -> None:
    texts = sts_sentences(count + 500)
    with tempfile.TemporaryDirectory() as root:
        processes, url = start_pair(Path(root))
        try:
            base = Settings(redis_url=url, data_dir=Path(root) / "data", calibrate=False,
                            cache=False)
            embedder = HashEmbedder(base) if backend == "fake" else load_embedder(base)
            await one_run(base, embedder, texts[count:])  # run-in (ONNX's first shapes)
            figures: dict[int, list[float]] = {-1: [], 0: []}
            for _ in range(rounds):
                for wait in (-1, 0):
                    figures[wait].append(await one_run(base.replace(wait_replicas=wait),
                                                       embedder, texts[:count]))
        finally:
            for process in processes:
                process.kill()
    waiting, plain = statistics.median(figures[-1]), statistics.median(figures[0])
    print(f"{count} texts, {backend}, primary + 1 replica on loopback, median of {rounds}:")
    print(f"  wait for the replica (-1): {waiting:8.1f} texts/s")
    print(f"  no wait (0):               {plain:8.1f} texts/s")
    print(f"  ratio:                     {waiting / plain:8.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--backend", choices=("onnx", "fake"), default="onnx")
    args = parser.parse_args()
    asyncio.run(main(args.texts, args.rounds, args.backend))
