"""A hand-driven JSON-RPC client of /mcp for the MCP tasks tests (the SDK's speaks no tasks).

Both wires the tasks tests drive: the 2025-11-25 handshake with its tasks
utility, and the stateless 2026-07-28 wire with the tasks extension.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson

ALICE, BOB = "alice-key", "bob-key"
LEGACY, MODERN = "2025-11-25", "2026-07-28"
EXTENSION = "io.modelcontextprotocol/tasks"
TEXTS = ["a cat sat", "on the mat", "a dog ran", "in the park", "and slept"]


class Wire:
    """One JSON-RPC client of /mcp at a protocol revision (2025-11-25 opens a session)."""

    def __init__(self, http: httpx.AsyncClient, version: str, key: str) -> None:
        self.http = http
        self.version = version
        self.headers = {"Authorization": f"Bearer {key}", "MCP-Protocol-Version": version,
                        "Accept": "application/json, text/event-stream"}
        self.ids = itertools.count(1)

    async def open(self) -> Wire:
        """The 2025-11-25 handshake; nothing to do on the stateless 2026-07-28 wire."""
        if self.version == LEGACY:
            reply = await self.post("initialize", {
                "protocolVersion": LEGACY, "capabilities": {},
                "clientInfo": {"name": "tasks-test", "version": "1"}})
            self.capabilities = reply["result"]["capabilities"]
            await self.http.post("/mcp", headers=self.headers, json={
                "jsonrpc": "2.0", "method": "notifications/initialized"})
        return self

    async def post(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Send a request; its JSON-RPC response (read from JSON or from the SSE stream)."""
        request_id = next(self.ids)
        headers = dict(self.headers)
        if self.version == MODERN:
            params = {**params, "_meta": {
                "io.modelcontextprotocol/clientCapabilities": {"extensions": {EXTENSION: {}}},
                "io.modelcontextprotocol/clientInfo": {"name": "tasks-test", "version": "1"},
                "io.modelcontextprotocol/protocolVersion": MODERN,
                **params.get("_meta", {})}}
            headers["Mcp-Method"] = method
            name = params.get("name", params.get("taskId"))
            if isinstance(name, str):
                headers["Mcp-Name"] = name
        reply = await self.http.post("/mcp", headers=headers, json={
            "jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        # The 2026-07-28 wire answers a JSON-RPC error with an HTTP error status too.
        assert reply.status_code == 200 or "error" in reply.json(), reply.text
        if "mcp-session-id" in reply.headers:
            self.headers["Mcp-Session-Id"] = reply.headers["mcp-session-id"]
        return _response(reply, request_id)

    async def result(self, method: str, **params: Any) -> dict[str, Any]:
        """A request that must succeed; its result."""
        reply = await self.post(method, params)
        assert "result" in reply, reply
        result: dict[str, Any] = reply["result"]
        return result


def _response(reply: httpx.Response, request_id: int) -> dict[str, Any]:
    if reply.headers["content-type"].startswith("application/json"):
        body: dict[str, Any] = reply.json()
        return body
    for line in reply.text.splitlines():
        if line.startswith("data:") and line[5:].strip():
            message: dict[str, Any] = orjson.loads(line[5:])
            if message.get("id") == request_id:
                return message
    raise AssertionError(f"no response to request {request_id}: {reply.text}")


@asynccontextmanager
async def client(base_url: str, version: str, key: str = ALICE) -> AsyncIterator[Wire]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        yield await Wire(http, version, key).open()
