"""MCP tasks over Streamable HTTP, as the specs write the requests (raw JSON-RPC with httpx).

The SDK's client speaks no tasks, so each wire is driven by hand: the
2025-11-25 handshake and its tasks utility, and the 2026-07-28 tasks
extension. The server is real (uvicorn on loopback); a worker with a fake
embedder runs in the test's loop, or not at all where a task must stay
unfinished (a restart, a cancel).
"""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder
from tests.support.live_server import live_server
from tests.support.mcp_tasks import BOB, LEGACY, MODERN, TEXTS, Wire, client
from tests.support.workers import running

pytestmark = pytest.mark.anyio


async def test_the_2025_11_25_wire_declares_tasks_and_runs_both_tools_as_tasks(
        task_settings: Settings) -> None:
    with live_server(task_settings) as url:
        async with client(url, LEGACY) as wire, running(task_settings,
                                                         HashEmbedder(task_settings)):
            assert wire.capabilities["tasks"] == {
                "list": {}, "cancel": {}, "requests": {"tools": {"call": {}}}}
            tools = {t["name"]: t for t in (await wire.result("tools/list"))["tools"]}
            assert tools["submit_job"]["execution"] == {"taskSupport": "optional"}
            assert tools["embed"]["execution"] == {"taskSupport": "optional"}
            assert "execution" not in tools["job_status"]

            created = await wire.result("tools/call", name="submit_job",
                                        arguments={"inputs": TEXTS}, task={"ttl": 60000})
            task = created["task"]
            # A worker is running: the job may end before the call answers.
            assert task["status"] in ("working", "completed") and task["pollInterval"] > 0
            assert {"createdAt", "lastUpdatedAt", "ttl"} <= set(task)
            got = await wire.result("tasks/get", taskId=task["taskId"])
            assert got["taskId"] == task["taskId"]
            done = await wire.result("tasks/result", taskId=task["taskId"])
            assert done["structuredContent"]["job_id"] == task["taskId"]
            assert done["structuredContent"]["status"] == "completed"
            assert done["_meta"]["io.modelcontextprotocol/related-task"] == {
                "taskId": task["taskId"]}
            assert (await wire.result("tasks/get", taskId=task["taskId"]))["status"] == (
                "completed")

            embed_task = (await wire.result("tools/call", name="embed", task={},
                                            arguments={"inputs": TEXTS[:3],
                                                       "encoding": "base64"}))["task"]
            as_task = await wire.result("tasks/result", taskId=embed_task["taskId"])
            direct = await wire.result("tools/call", name="embed",
                                       arguments={"inputs": TEXTS[:3], "encoding": "base64"})
            assert as_task["structuredContent"] == direct["structuredContent"]
            assert as_task["content"] == direct["content"]

            listed = await wire.result("tasks/list")
            ids = {t["taskId"] for t in listed["tasks"]}
            assert task["taskId"] in ids and embed_task["taskId"].split(".")[0] in ids


async def test_a_task_tool_error_is_a_tool_error_and_makes_no_task(
        task_settings: Settings) -> None:
    with live_server(task_settings) as url:
        async with client(url, LEGACY) as wire:
            reply = await wire.result("tools/call", name="embed", task={},
                                      arguments={"inputs": ["ok", " "]})
            assert reply["isError"] and "invalid_input" in reply["content"][0]["text"]
            assert (await wire.result("tasks/list"))["tasks"] == []


async def test_a_task_survives_a_server_restart_and_completes(task_settings: Settings) -> None:
    with live_server(task_settings) as url:
        async with client(url, LEGACY) as wire:
            created = await wire.result("tools/call", name="submit_job",
                                        arguments={"inputs": TEXTS}, task={"ttl": 1000})
    task_id = created["task"]["taskId"]
    with live_server(task_settings) as url:  # a new server over the same Redis
        async with client(url, LEGACY) as wire:
            assert (await wire.result("tasks/get", taskId=task_id))["status"] == "working"
            async with running(task_settings, HashEmbedder(task_settings)):
                done = await wire.result("tasks/result", taskId=task_id)
            assert done["structuredContent"]["status"] == "completed"


async def test_cancel_ends_a_task_and_another_tenant_finds_no_task(
        task_settings: Settings) -> None:
    with live_server(task_settings) as url:
        async with client(url, LEGACY) as alice, client(url, LEGACY, BOB) as bob:
            task_id = (await alice.result("tools/call", name="submit_job",
                                          arguments={"inputs": TEXTS}, task={}))["task"]["taskId"]
            for method in ("tasks/get", "tasks/result", "tasks/cancel"):
                error = (await bob.post(method, {"taskId": task_id}))["error"]
                assert error["code"] == -32602 and "not found" in error["message"]
            assert (await bob.result("tasks/list"))["tasks"] == []

            cancelled = await alice.result("tasks/cancel", taskId=task_id)
            assert cancelled["status"] == "cancelled"
            again = (await alice.post("tasks/cancel", {"taskId": task_id}))["error"]
            assert again["code"] == -32602 and "already cancelled" in again["message"]
            ended = await alice.result("tasks/result", taskId=task_id)
            assert ended["structuredContent"]["status"] == "cancelled"


async def test_the_2026_07_28_extension_answers_tasks_with_results_inline(
        task_settings: Settings) -> None:
    with live_server(task_settings) as url:
        async with client(url, MODERN) as wire, client(url, MODERN, BOB) as bob:
            created = await wire.result("tools/call", name="embed",
                                        arguments={"inputs": TEXTS[:2]})
            assert created["resultType"] == "task" and created["status"] == "working"
            assert {"ttlMs", "pollIntervalMs", "createdAt"} <= set(created)
            task_id = created["taskId"]
            missing = (await bob.post("tasks/get", {"taskId": task_id}))["error"]
            assert "not found" in missing["message"]
            async with running(task_settings, HashEmbedder(task_settings)):
                got = await _until_done(wire, task_id)
            assert got["resultType"] == "complete" and got["status"] == "completed"
            assert len(got["result"]["structuredContent"]["embeddings"]) == 2

            later = await wire.result("tools/call", name="submit_job",
                                      arguments={"inputs": TEXTS})
            assert await wire.result("tasks/cancel", taskId=later["taskId"]) == {
                "resultType": "complete", "_meta": got["_meta"]}
            assert (await wire.result("tasks/get", taskId=later["taskId"]))["status"] == (
                "cancelled")


async def _until_done(wire: Wire, task_id: str) -> dict[str, Any]:
    with anyio.fail_after(20):
        while True:
            got = await wire.result("tasks/get", taskId=task_id)
            if got["status"] != "working":
                return got
            await anyio.sleep(0.05)
