"""SSE fan-out at scale: many subscribers on one real server, over loopback.

Starts an embedded Valkey, one `embedstream serve` (a real uvicorn process)
and one worker with the fake hash embedder (the model is not what is
measured here), then:

1. opens N `/v1/events` streams (default 1,000), submits one job and waits
   until every stream has seen its `job.completed`;
2. opens M streams of one K-text job (default 200 of 4,000, base64) and
   checks that every stream receives every result index, then `end`.

Prints, for each part: subscribers that saw everything, seconds from submit
to the last one, Redis connections (CLIENT LIST) before and while the
subscribers are attached, and the server's peak RSS. Figures, not
assertions; the baseline is the same server before any subscriber.

    .venv/bin/python bench/fanout.py [--feed 1000] [--job-subscribers 200] [--texts 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.store.embedded import EmbeddedRedis  # noqa: E402
from tests.support.processes import start_server, start_worker, wait_for_workers  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def redis_clients(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        return len(client.client_list())


async def open_stream(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"{path}: {status!r}")
    return reader, writer


async def events(reader: asyncio.StreamReader) -> Any:
    """(event name, data bytes) of a chunked SSE body, read line by line."""
    name, data = b"message", b""
    while True:
        line = await reader.readline()
        if not line:
            return
        line = line.rstrip(b"\r\n")
        if line.startswith(b"event: "):
            name = line[7:]
        elif line.startswith(b"data: "):
            data = line[6:]
        elif line == b"" and data:
            yield name, data
            name, data = b"message", b""


class Sampler:
    """Samples the server's RSS and Redis's client count while a part runs."""

    def __init__(self, pid: int, url: str) -> None:
        self.pid, self.url = pid, url
        self.peak_rss = self.peak_clients = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.peak_rss = max(self.peak_rss, rss_mb(self.pid))
            clients = await asyncio.to_thread(redis_clients, self.url)
            self.peak_clients = max(self.peak_clients, clients)
            await asyncio.sleep(0.5)

    def __enter__(self) -> Sampler:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def feed_part(base: str, port: int, pid: int, url: str, count: int) -> dict[str, Any]:
    baseline = redis_clients(url)
    rss_before = rss_mb(pid)
    streams = []
    for start in range(0, count, 100):
        streams += await asyncio.gather(*(open_stream(port, "/v1/events")
                                          for _ in range(start, min(start + 100, count))))
    job_id: list[str] = []
    done_at: list[float] = []
    submitted = asyncio.Event()

    async def watch(reader: asyncio.StreamReader) -> None:
        await submitted.wait()
        async for name, data in events(reader):
            if name == b"job.completed" and orjson.loads(data)["id"] == job_id[0]:
                done_at.append(time.monotonic())
                return

    with Sampler(pid, url) as sampler:
        watchers = [asyncio.ensure_future(watch(reader)) for reader, _ in streams]
        await asyncio.sleep(2)  # every stream has had time to send its replay
        async with httpx.AsyncClient() as http:
            reply = await http.post(f"{base}/v1/jobs", json={"inputs": ["fan out", "to all"]})
        job_id.append(reply.json()["id"])
        started = time.monotonic()
        submitted.set()
        await asyncio.wait(watchers, timeout=120)
        attached = redis_clients(url)
    for _, writer in streams:
        writer.close()
    return {"subscribers": count, "saw_completion": len(done_at),
            "seconds_to_last": round(max(done_at) - started, 2) if done_at else None,
            "redis_clients_before": baseline, "redis_clients_attached": attached,
            "redis_clients_peak": int(sampler.peak_clients),
            "server_rss_mb_before": round(rss_before, 1),
            "server_rss_mb_peak": round(sampler.peak_rss, 1)}


async def job_part(base: str, port: int, pid: int, url: str, count: int,
                   texts: int) -> dict[str, Any]:
    baseline = redis_clients(url)
    async with httpx.AsyncClient(timeout=60) as http:
        reply = await http.post(f"{base}/v1/jobs", json={
            "inputs": [f"text number {i} of the fan-out job" for i in range(texts)]})
    job_id = reply.json()["id"]
    started = time.monotonic()
    path = f"/v1/jobs/{job_id}/events?encoding=base64"
    streams = await asyncio.gather(*(open_stream(port, path) for _ in range(count)))
    complete: list[float] = []

    async def watch(reader: asyncio.StreamReader) -> None:
        seen: set[int] = set()
        async for name, data in events(reader):
            if name == b"result":
                seen.update(row["index"] for row in orjson.loads(data))
            elif name == b"end":
                break
        if len(seen) == texts:
            complete.append(time.monotonic())

    with Sampler(pid, url) as sampler:
        await asyncio.wait([asyncio.ensure_future(watch(r)) for r, _ in streams], timeout=600)
        attached = redis_clients(url)
    for _, writer in streams:
        writer.close()
    return {"subscribers": count, "texts": texts, "received_every_result": len(complete),
            "seconds_to_last": round(max(complete) - started, 2) if complete else None,
            "redis_clients_before": baseline, "redis_clients_attached": attached,
            "redis_clients_peak": int(sampler.peak_clients),
            "server_rss_mb_peak": round(sampler.peak_rss, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--feed", type=int, default=1000)
    parser.add_argument("--job-subscribers", type=int, default=200)
    parser.add_argument("--texts", type=int, default=4000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, \
            EmbeddedRedis(Path(tmp) / "redis", binary="valkey") as server_redis:
        root = Path(tmp)
        worker = start_worker(server_redis.url, root, "fake",
                              EMBEDSTREAM_BACKEND="tests.support.fakes:HashEmbedder")
        server, base = start_server(server_redis.url, root)
        try:
            wait_for_workers(base, 1)
            port = int(base.rsplit(":", 1)[1])
            pid = server.popen.pid
            feed = asyncio.run(feed_part(base, port, pid, server_redis.url, args.feed))
            print("feed:", orjson.dumps(feed).decode())
            job = asyncio.run(job_part(base, port, pid, server_redis.url,
                                       args.job_subscribers, args.texts))
            print("job: ", orjson.dumps(job).decode())
        finally:
            server.stop()
            worker.stop()


if __name__ == "__main__":
    main()
