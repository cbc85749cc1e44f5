"""The MCP server over its three transports, through real processes and the official client.

One `embedstream serve` (API keys on, a public host name allowed) and one
`embedstream worker` run for the module against a Valkey of their own;
stdio tests start `embedstream mcp` as a desktop agent would. Every transport
lists the tools and the job resource template, calls every tool and reads a
job resource (`mcp_sessions.exercise_every_tool`).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp_types import LATEST_PROTOCOL_VERSION
from mcp_types.version import LATEST_HANDSHAKE_VERSION

from pipeline.store.embedded import EmbeddedRedis
from tests.support.mcp_sessions import (
    call,
    exercise_every_tool,
    read_all_results,
    sts_dev_pairs,
    wait_for_status,
)
from tests.support.processes import ROOT, Process, start_server, start_worker, wait_for_workers

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

API_KEY = "mcp-test-key"
PUBLIC_HOST = "embed.example.com"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass(frozen=True)
class Stack:
    base: str
    redis_data_dir: Path
    log_dir: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A server (API key, public host allowed) and a worker on a Valkey of their own."""
    root = tmp_path_factory.mktemp("mcp-stack")
    processes: list[Process] = []
    with EmbeddedRedis(root / "redis", binary="valkey") as redis_server:
        try:
            processes.append(start_worker(redis_server.url, root, "mcp"))
            server, base = start_server(redis_server.url, root, EMBEDSTREAM_API_KEYS=API_KEY,
                                        EMBEDSTREAM_ALLOWED_HOSTS=PUBLIC_HOST)
            processes.append(server)
            wait_for_workers(base, 1)
            yield Stack(base, redis_server.data_dir, root)
        finally:
            for process in processes:
                process.stop()


@asynccontextmanager
async def http_client(headers: dict[str, str]) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(headers=headers,
                                  timeout=httpx2.Timeout(30, read=300)) as client:
        yield client


async def test_streamable_http_clients_use_every_tool_at_the_current_protocol_revision(
    stack: Stack
) -> None:
    # Reached under its public name, as a remote agent behind DNS would.
    async with http_client({**AUTH, "Host": PUBLIC_HOST}) as http, Client(
            streamable_http_client(f"{stack.base}/mcp", http_client=http)) as client:
        assert client.protocol_version == LATEST_PROTOCOL_VERSION
        await exercise_every_tool(client)


async def test_streamable_http_clients_of_the_handshake_era_use_every_tool(
    stack: Stack
) -> None:
    async with http_client(AUTH) as http, Client(
            streamable_http_client(f"{stack.base}/mcp", http_client=http),
            mode="legacy") as client:
        assert client.protocol_version == LATEST_HANDSHAKE_VERSION
        await exercise_every_tool(client)


async def test_legacy_sse_clients_use_every_tool(stack: Stack) -> None:
    async with Client(sse_client(f"{stack.base}/sse", headers=AUTH), mode="legacy") as client:
        assert client.protocol_version == LATEST_HANDSHAKE_VERSION
        await exercise_every_tool(client)


async def test_stdio_clients_use_every_tool(stack: Stack) -> None:
    # No Redis URL: like a desktop agent's `embedstream mcp`, it finds the embedded
    # server running for its data directory, and so the same queue and workers.
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "embedstream", "mcp"], cwd=ROOT,
        env={"EMBEDSTREAM_DATA_DIR": str(stack.redis_data_dir), "HF_HUB_OFFLINE": "1",
             "PYTHONPATH": str(ROOT)})
    with (stack.log_dir / "mcp-stdio.log").open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            assert client.protocol_version == LATEST_PROTOCOL_VERSION
            await exercise_every_tool(client)


async def test_the_sts_dev_set_as_one_job_pages_every_index_once_and_finds_its_sentences(
    stack: Stack
) -> None:
    texts = [text for _, first, second in sts_dev_pairs() for text in (first, second)]
    assert len(texts) == 3000
    async with http_client(AUTH) as http, Client(
            streamable_http_client(f"{stack.base}/mcp", http_client=http)) as client:
        handle = await call(client, "submit_job", inputs=texts, idempotency_key="sts-dev")
        assert handle["total"] == 3000
        await wait_for_status(client, handle["job_id"], "completed", 540)
        rows = await read_all_results(client, handle["job_id"], limit=1000, encoding="base64")
        for query in (texts[0], texts[1501], texts[2999]):
            found = await call(client, "search_job", job_id=handle["job_id"], query=query,
                               top_k=3)
            assert found["matches"][0]["text"] == query
    assert sorted(row["index"] for row in rows) == list(range(3000))
    assert all(row["embedding"] and not row.get("error") for row in rows)


async def test_job_resource_subscribers_hear_updates_over_streamable_http(stack: Stack) -> None:
    async with http_client(AUTH) as http, Client(
            streamable_http_client(f"{stack.base}/mcp", http_client=http)) as client:
        handle = await call(client, "submit_job",
                            inputs=[f"update number {i}" for i in range(200)])
        uri = handle["resource"]
        heard = 0
        async with client.listen(resource_subscriptions=[uri]) as updates:
            with anyio.fail_after(120):
                while True:
                    read = await client.read_resource(uri, cache_mode="bypass")
                    if '"completed"' in getattr(read.contents[0], "text", ""):
                        break
                    event = await anext(updates)
                    assert getattr(event, "uri", None) == uri
                    heard += 1
    assert heard >= 1


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({**AUTH, "Host": "evil.example"}, 421),
    ({**AUTH, "Origin": "http://evil.example"}, 403),
])
def test_http_transports_refuse_missing_keys_and_unknown_hosts_or_origins(
    stack: Stack, headers: dict[str, str], status: int
) -> None:
    for path in ("/mcp", "/sse/messages/"):
        reply = httpx.post(f"{stack.base}{path}", json={}, headers=headers, timeout=10)
        assert reply.status_code == status, (path, reply.text)
