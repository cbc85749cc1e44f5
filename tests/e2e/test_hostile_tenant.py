"""Two tenants on one real server: B attacks it every way a tenant can, A's work all completes.

Tenant B floods `/v1/embeddings`, uploads slowly, probes the cache and
`/metrics`, opens 500 SSE streams it never reads and 50 dashboard sessions,
and asks for A's job, while tenant A runs a 2,000-text job followed over
SSE and 20 interactive requests. A's work must all complete; B gets 429s
and 4xx, never A's data; the server's RSS stays under 400 MB.

The worker is the fake embedder with a small delay per model call, so a
flood queues up behind it as it would behind a busy model.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support.processes import Process, start_server, start_worker, wait_for_workers
from tests.support.sse_client import SSE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]  # reason: six attacks and a job

KEY_A, KEY_B = "tenant-a-key-0123456789", "tenant-b-key-0123456789"
QUOTAS = {"EMBEDSTREAM_KEY_QUOTA_REQUESTS": "32", "EMBEDSTREAM_KEY_QUOTA_SESSIONS": "10",
          "EMBEDSTREAM_KEY_QUOTA_JOBS": "20", "EMBEDSTREAM_KEY_QUOTA_TEXTS": "20000"}
ENV = {"EMBEDSTREAM_API_KEYS": f"{KEY_A},{KEY_B}",
       "EMBEDSTREAM_BACKEND": "tests.support.fakes:SlowEmbedder",
       "EMBEDSTREAM_FAKE_DELAY_S": "0.01", "EMBEDSTREAM_CALIBRATE": "0", **QUOTAS}
A_TEXTS = [f"tenant a private sentence number {i}" for i in range(2000)]
SSE_STREAMS = 500
SESSIONS = 50
FLOOD = 300
MAX_RSS_MB = 400


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def peak_rss(pid: int) -> Iterator[list[float]]:
    """Samples a process's RSS every 50 ms; the list holds the peak so far."""
    peak = [rss_mb(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], rss_mb(pid))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@asynccontextmanager
async def tenant(base: str, key: str) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=SSE_STREAMS + FLOOD + 100, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=base, headers=auth(key), timeout=120,
                                 limits=limits) as client:
        yield client


async def events_of(client: httpx.AsyncClient, path: str) -> list[SSE]:
    """Every event of an SSE stream that ends by itself (a job's)."""
    seen: list[SSE] = []
    async with client.stream("GET", path) as response:
        assert response.status_code == 200, await response.aread()
        event, data = "message", []
        async for line in response.aiter_lines():
            if line == "":
                if data:
                    seen.append(SSE(None, event, orjson.loads("\n".join(data))))
                event, data = "message", []
            elif line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
    return seen


async def tenant_a(base: str, announce: asyncio.Future[str]) -> dict[str, Any]:
    """A's 2,000-text job over SSE and 20 interactive requests; what came back."""
    async with tenant(base, KEY_A) as client:
        reply = await client.post("/v1/jobs", json={"inputs": A_TEXTS})
        assert reply.status_code == 202, reply.text
        job_id = reply.json()["id"]
        announce.set_result(job_id)  # B's probes guess it (B learns it from nowhere else)
        stream = asyncio.create_task(events_of(client, f"/v1/jobs/{job_id}/events"))
        answers = await asyncio.gather(*(
            client.post("/v1/embeddings", json={"input": f"a's question {i}"})
            for i in range(20)))
        seen = await asyncio.wait_for(stream, 150)
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
    rows = [row for e in seen if e.event == "result" for row in e.data]
    return {"job_id": job_id, "job": job, "rows": rows, "events": seen,
            "interactive": [a.status_code for a in answers]}


async def b_flood(client: httpx.AsyncClient) -> Counter[int]:
    answers = await asyncio.gather(*(
        client.post("/v1/embeddings", json={"input": f"b's flood {i}"}) for i in range(FLOOD)))
    big = await asyncio.gather(*(
        client.post("/v1/embeddings", json={"input": [f"b's batch {j} {i}" for i in range(1000)]})
        for j in range(30)))
    return Counter(a.status_code for a in [*answers, *big])


async def b_slow_upload(client: httpx.AsyncClient) -> int:
    async def lines() -> AsyncIterator[bytes]:
        for i in range(40):
            yield orjson.dumps(f"b's slow line {i}") + b"\n"
            await asyncio.sleep(0.1)
    reply = await client.post("/v1/jobs", content=lines(),
                              headers={"content-type": "application/x-ndjson"})
    return reply.status_code


async def b_probes(client: httpx.AsyncClient, a_job: asyncio.Future[str]) -> dict[str, int]:
    guess = await client.post("/v1/embeddings", json={"input": A_TEXTS[0]})
    metrics = await client.get("/metrics")
    job_id = await a_job
    return {"guess": guess.status_code, "metrics": metrics.status_code,
            "a_job": (await client.get(f"/v1/jobs/{job_id}")).status_code,
            "a_events": (await client.get(f"/v1/jobs/{job_id}/results")).status_code,
            "a_cancel": (await client.delete(f"/v1/jobs/{job_id}")).status_code}


async def b_sessions(base: str) -> Counter[int]:
    async with httpx.AsyncClient(base_url=base, timeout=30) as anonymous:
        answers = []
        for _ in range(SESSIONS):  # each a new browser: no cookie of the last sign-in
            anonymous.cookies.clear()
            answers.append(await anonymous.post("/v1/session", json={"key": KEY_B}))
    return Counter(a.status_code for a in answers)


@asynccontextmanager
async def b_streams(client: httpx.AsyncClient) -> AsyncIterator[list[int]]:
    """500 feed streams that B opens and never reads."""
    opened: list[int] = []
    streams = []
    try:
        for _ in range(SSE_STREAMS):
            response = await client.send(client.build_request("GET", "/v1/events"), stream=True)
            opened.append(response.status_code)
            streams.append(response)
        yield opened
    finally:
        await asyncio.gather(*(s.aclose() for s in streams), return_exceptions=True)


async def attack(base: str) -> dict[str, Any]:
    async with tenant(base, KEY_B) as b, b_streams(b) as opened:
        a_job: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        attacks = asyncio.gather(b_flood(b), b_slow_upload(b), b_probes(b, a_job),
                                 b_sessions(base))
        a = await tenant_a(base, a_job)
        flood, upload, probes, sessions = await attacks
        b_jobs = (await b.get("/v1/jobs", params={"limit": 200})).json()
        feed_sample = await feed_text(b)
    return {"a": a, "flood": flood, "upload": upload, "probes": probes, "sessions": sessions,
            "streams": Counter(opened), "b_jobs": b_jobs, "feed": feed_sample}


async def feed_text(client: httpx.AsyncClient) -> str:
    """What B's feed replays (the last events of every job B may see), read for a second."""
    text: list[str] = []

    async def read() -> None:
        async with client.stream("GET", "/v1/events") as response:
            async for chunk in response.aiter_text():
                text.append(chunk)

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(read(), 1.0)
    return "".join(text)


@pytest.fixture
def server(redis_url: str, tmp_path: Path) -> Iterator[tuple[Process, str]]:
    worker = start_worker(redis_url, tmp_path, "fake", **ENV)
    process, base = start_server(redis_url, tmp_path, **ENV)
    try:
        wait_for_workers(base, 1)
        yield process, base
    finally:
        process.stop()
        worker.stop()


def test_tenant_a_completes_while_tenant_b_attacks_the_server(
    server: tuple[Process, str],
) -> None:
    process, base = server
    with peak_rss(process.popen.pid) as peak:
        seen = asyncio.run(attack(base))
    a = seen["a"]
    print(f"peak RSS {peak[0]:.0f} MB; B flood {dict(seen['flood'])}, upload {seen['upload']}, "
          f"sessions {dict(seen['sessions'])}, probes {seen['probes']}")
    assert a["job"]["status"] == "completed" and a["job"]["done"] == 2000, a["job"]
    assert sorted(row["index"] for row in a["rows"]) == list(range(2000))
    assert a["events"][-1].event == "end"
    assert a["interactive"] == [200] * 20
    # B: throttled, refused, never shown A's job.
    assert seen["flood"][429] > 0 and seen["flood"][200] > 0, seen["flood"]
    assert set(seen["flood"]) <= {200, 429}, seen["flood"]
    assert seen["upload"] in (202, 429), seen["upload"]
    assert seen["probes"]["metrics"] == 403
    assert seen["probes"]["a_job"] == seen["probes"]["a_events"] == 404
    assert seen["probes"]["a_cancel"] == 404
    assert seen["sessions"][200] == int(QUOTAS["EMBEDSTREAM_KEY_QUOTA_SESSIONS"]), seen["sessions"]
    assert seen["sessions"][429] == SESSIONS - seen["sessions"][200], seen["sessions"]
    assert a["job_id"] not in {job["id"] for job in seen["b_jobs"]["jobs"]}
    assert "job." in seen["feed"] and a["job_id"] not in seen["feed"]
    assert seen["streams"][200] == SSE_STREAMS, seen["streams"]
    assert peak[0] < MAX_RSS_MB, f"server RSS peaked at {peak[0]:.0f} MB"
