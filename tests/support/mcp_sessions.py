"""What the MCP tests do with a connected client, whatever the transport.

`exercise_every_tool` lists the tools and the job resource template, calls
every tool once or more, and reads a job resource, checking each answer; the
in-process tests and the tests over real processes share it.
"""

from __future__ import annotations

import base64
import csv
from typing import Any

import anyio
import numpy as np
from mcp import Client
from mcp_types import CallToolResult

from tests.support.sts_data import STS_DEV

TOOLS = {"embed", "similarity", "submit_job", "job_status", "job_results", "search_job",
         "cancel_job", "list_models"}
JOB_TEMPLATE = "embedstream://jobs/{job_id}"
POLL_S = 0.1


def sts_dev_pairs() -> list[tuple[float, str, str]]:
    """(gold score, sentence 1, sentence 2) of every STS-B dev pair."""
    with STS_DEV.open(encoding="utf-8") as handle:
        rows = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [(float(row[4]), row[5], row[6]) for row in rows]


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    """Call a tool that must succeed; its structured content."""
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, f"{tool} failed: {text_of(result)}"
    content: dict[str, Any] | None = result.structured_content
    assert content is not None
    return content


async def call_error(client: Client, tool: str, **arguments: Any) -> str:
    """Call a tool that must fail; the error text the agent reads."""
    result = await client.call_tool(tool, arguments)
    assert result.is_error, f"{tool} unexpectedly succeeded: {result.structured_content}"
    return text_of(result)


def text_of(result: CallToolResult) -> str:
    return " ".join(getattr(block, "text", "") for block in result.content)


async def wait_for_status(
    client: Client, job_id: str, status: str, timeout_s: float
) -> dict[str, Any]:
    """Poll job_status until the job reaches `status` (or fail after `timeout_s`)."""
    with anyio.fail_after(timeout_s):
        while True:
            job = await call(client, "job_status", job_id=job_id)
            if job["status"] == status:
                return job
            assert job["status"] in ("queued", "running"), job
            await anyio.sleep(POLL_S)


async def read_all_results(client: Client, job_id: str, limit: int,
                           encoding: str = "float") -> list[dict[str, Any]]:
    """Every result row of a job, page by page until next_cursor is null."""
    rows: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = await call(client, "job_results", job_id=job_id, cursor=cursor, limit=limit,
                          encoding=encoding)
        assert len(page["results"]) <= limit
        rows += page["results"]
        cursor = page["next_cursor"]
        if cursor is None:
            return rows


def vector(embedding: list[float] | str) -> np.ndarray[Any, np.dtype[np.float32]]:
    """A result's embedding as float32, whichever encoding it came in."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


async def exercise_every_tool(client: Client, timeout_s: float = 120) -> None:
    """List tools and resources, call every tool, read a job resource."""
    listed = await client.list_tools()
    assert {tool.name for tool in listed.tools} == TOOLS
    assert all(tool.output_schema and tool.description for tool in listed.tools)
    templates = await client.list_resource_templates()
    assert [t.uri_template for t in templates.resource_templates] == [JOB_TEMPLATE]
    assert (await client.list_resources()).resources == []

    pairs = sts_dev_pairs()[:20]
    firsts = [first for _, first, _ in pairs]
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    embedded = await client.call_tool("embed", {"inputs": firsts}, progress_callback=on_progress)
    assert not embedded.is_error, text_of(embedded)
    assert embedded.structured_content is not None
    vectors = embedded.structured_content["embeddings"]
    assert len(vectors) == len(firsts) and len(vectors[0]) == 384
    assert seen == sorted(set(seen)) and seen[-1] == len(firsts)

    _, first, second = pairs[0]
    ranked = await call(client, "similarity", query=first,
                        candidates=[pairs[5][2], second, pairs[9][2]])
    assert ranked["matches"][0]["index"] == 1
    assert ranked["matches"][0]["text"] == second

    inputs = [{"id": f"s{i}", "text": text, "metadata": {"pair": i}}
              for i, (_, _, text) in enumerate(pairs)]
    handle = await call(client, "submit_job", inputs=inputs)
    assert handle["total"] == len(inputs)
    assert handle["resource"] == JOB_TEMPLATE.format(job_id=handle["job_id"])
    job_id = handle["job_id"]
    await wait_for_status(client, job_id, "completed", timeout_s)

    rows = await read_all_results(client, job_id, limit=7, encoding="base64")
    assert [row["index"] for row in rows] == list(range(len(inputs)))
    assert [row["id"] for row in rows] == [item["id"] for item in inputs]
    assert vector(rows[0]["embedding"]).shape == (384,)

    found = await call(client, "search_job", job_id=job_id, query=pairs[3][2], top_k=3)
    assert len(found["matches"]) == 3
    assert found["matches"][0]["id"] == "s3"
    assert found["matches"][0]["metadata"] == {"pair": 3}

    resource = await client.read_resource(handle["resource"])
    assert resource.contents[0].mime_type == "application/json"
    assert '"status":"completed"' in getattr(resource.contents[0], "text", "")

    cancelled = await call(client, "cancel_job", job_id=job_id)
    assert cancelled["status"] == "completed"  # a finished job is left as it is
    assert "invalid_job_id" in await call_error(client, "job_status", job_id="not-a-job")
