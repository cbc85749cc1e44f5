"""Tenants: every surface that names a job, for every kind of caller (the auth matrix).

A job is created by alice's key. Then each caller (no key, a wrong key,
bob's key, alice's key, an admin key) tries every surface that reads or
changes a job: REST status, results and cancel, the job's SSE stream, the
live feed, the job list, the MCP tools and the job resource. Anyone but
alice and the admin must not even learn that the job exists: 404 (or
`job_not_found`), never 403, and the feed and the list leave it out.

The server is real (uvicorn on loopback, in a thread) because the feed is
an endless stream; a worker with a fake embedder runs in the test's loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder
from tests.support.live_server import live_server
from tests.support.sse_client import read_events
from workers.worker import run_worker

pytestmark = pytest.mark.anyio

ALICE, BOB, ADMIN = "alice-key", "bob-key", "admin-key"


@dataclass(frozen=True)
class Identity:
    name: str
    headers: dict[str, str]
    authenticated: bool
    sees_alice: bool


IDENTITIES = [
    Identity("no key", {}, False, False),
    Identity("wrong key", {"Authorization": "Bearer not-a-key"}, False, False),
    Identity("another tenant", {"Authorization": f"Bearer {BOB}"}, True, False),
    Identity("the owner", {"Authorization": f"Bearer {ALICE}"}, True, True),
    Identity("an admin", {"X-API-Key": ADMIN}, True, True),
]


@pytest.fixture
def tenant_settings(settings: Settings) -> Settings:
    return settings.replace(api_keys=(ALICE, BOB), admin_keys=(ADMIN,), block_ms=100,
                            chunk_size=4, fast_lane_max_texts=4, stats_interval_s=0.2,
                            heartbeat_interval_s=0.2, heartbeat_ttl_s=2.0)


@asynccontextmanager
async def worker(settings: Settings) -> AsyncIterator[None]:
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(run_worker(settings, HashEmbedder(settings), stop, ready))
    try:
        with anyio.fail_after(10):
            await ready.wait()
        yield
    finally:
        stop.set()
        with anyio.fail_after(10):
            await task


async def completed_job(http: httpx.AsyncClient, key: str, texts: list[str]) -> str:
    auth = {"Authorization": f"Bearer {key}"}
    reply = await http.post("/v1/jobs", json={"inputs": texts}, headers=auth)
    assert reply.status_code == 202, reply.text
    job_id: str = reply.json()["id"]
    with anyio.fail_after(15):
        while (await http.get(f"/v1/jobs/{job_id}", headers=auth)).json()["status"] != "completed":
            await anyio.sleep(0.02)
    return job_id


def feed_job_ids(base: str, headers: dict[str, str]) -> set[str]:
    """Job ids the feed shows this caller: its replay, up to the second stats event."""
    seen: set[str] = set()
    stats = 0
    with httpx.stream("GET", f"{base}/v1/events", headers=headers, timeout=10) as response:
        assert response.status_code == 200
        for event in read_events(response):
            if event.event == "stats":
                stats += 1
                if stats == 2:
                    return seen
            elif event.event.startswith("job."):
                seen.add(event.data["id"])
    raise AssertionError("the feed ended")


def job_stream(base: str, job_id: str, headers: dict[str, str]) -> tuple[int, list[str]]:
    """(status, event names) of the job's SSE stream."""
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers=headers,
                      timeout=10) as response:
        if response.status_code != 200:
            response.read()
            return response.status_code, []
        return 200, [event.event for event in read_events(response)]


async def mcp_answers(base: str, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    """What each MCP tool and the job resource answer this caller about the job."""
    answers: dict[str, Any] = {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30)) as http, Client(
            streamable_http_client(f"{base}/mcp", http_client=http)) as client:
        for tool, arguments in [("job_status", {}), ("job_results", {}),
                                ("search_job", {"query": "alpha one"}), ("cancel_job", {})]:
            result = await client.call_tool(tool, {"job_id": job_id, **arguments})
            text = " ".join(getattr(block, "text", "") for block in result.content)
            # The SDK prefixes the tool's own error text with "Error executing tool …: ".
            answers[tool] = "ok" if not result.is_error else text.split(": ")[1]
        try:
            await client.read_resource(f"embedstream://jobs/{job_id}")
            answers["resource"] = "ok"
        except Exception as error:  # the SDK raises MCPError for a missing resource
            answers["resource"] = type(error).__name__ + ": " + str(error)
    return answers


@pytest.mark.parametrize("who", IDENTITIES, ids=[i.name for i in IDENTITIES])
async def test_every_surface_shows_a_job_to_its_owner_and_admins_only(
    tenant_settings: Settings, who: Identity
) -> None:
    with live_server(tenant_settings) as base:
        async with worker(tenant_settings), httpx.AsyncClient(base_url=base) as http:
            job_id = await completed_job(http, ALICE, ["alpha one", "beta two", "gamma"])
            bobs = await completed_job(http, BOB, ["delta"])
            headers = who.headers
            replies = {
                "status": await http.get(f"/v1/jobs/{job_id}", headers=headers),
                "results": await http.get(f"/v1/jobs/{job_id}/results", headers=headers),
                "cancel": await http.delete(f"/v1/jobs/{job_id}", headers=headers),
                "list": await http.get("/v1/jobs", headers=headers),
            }
            stream_status, stream_events = await anyio.to_thread.run_sync(
                job_stream, base, job_id, headers)
            if not who.authenticated:
                assert {name: r.status_code for name, r in replies.items()} == dict.fromkeys(
                    replies, 401)
                assert stream_status == 401
                feed = await http.get("/v1/events", headers=headers)
                assert feed.status_code == 401
                mcp = await http.post("/mcp", json={}, headers=headers)
                assert mcp.status_code == 401
                return
            listed = [job["id"] for job in replies["list"].json()["jobs"]]
            feed_ids = await anyio.to_thread.run_sync(feed_job_ids, base, headers)
            answers = await mcp_answers(base, headers, job_id)
    expected = 200 if who.sees_alice else 404
    assert {name: r.status_code for name, r in replies.items() if name != "list"} == {
        "status": expected, "results": expected, "cancel": expected}
    if not who.sees_alice:
        for name in ("status", "results", "cancel"):
            assert replies[name].json()["error"]["code"] == "job_not_found"
    assert stream_status == expected
    assert (stream_events[-1:] == ["end"]) is who.sees_alice
    assert (job_id in listed) is who.sees_alice
    assert (job_id in feed_ids) is who.sees_alice
    sees_bobs = who.name in ("another tenant", "an admin")
    assert (bobs in listed) is sees_bobs
    assert (bobs in feed_ids) is sees_bobs
    if who.sees_alice:
        assert answers == dict.fromkeys(answers, "ok")
    else:
        assert {k: v for k, v in answers.items() if k != "resource"} == dict.fromkeys(
            ("job_status", "job_results", "search_job", "cancel_job"), "job_not_found")
        assert "does not exist" in answers["resource"]
