"""Shared helpers of the REST tests: the app in-process, the one error shape, submitting,
polling, parsing SSE."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx

from mcp_server.app import create_app
from pipeline.settings import Settings


def assert_error(response: httpx.Response, status: int, code: str | None = None,
                 *words: str) -> dict[str, Any]:
    """The one error shape, with the status, code and words expected in the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    for word in words:
        assert word in error["message"], error
    return error


async def submit(client: httpx.AsyncClient, inputs: list[Any], **options: Any) -> str:
    response = await client.post("/v1/jobs", json={"inputs": inputs, **options})
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


async def wait_done(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """Poll the status endpoint until the job is finished."""
    with anyio.fail_after(15):
        while True:
            job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
            if job["status"] in ("completed", "failed", "cancelled"):
                return job
            await anyio.sleep(0.02)


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Events of a whole text/event-stream body: [{"id", "event", "data"}]."""
    events = []
    for block in re.split(r"\r?\n\r?\n", text):
        fields: dict[str, Any] = {}
        for line in block.splitlines():
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value[1:] if value.startswith(" ") else value
        if "data" in fields:
            fields["data"] = json.loads(fields["data"])
            events.append(fields)
    return events


@contextlib.asynccontextmanager
async def serving(settings: Settings, base_url: str = "http://127.0.0.1"
                  ) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process (lifespan run, no MCP), and a client that talks to it."""
    app = create_app(settings, with_mcp=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
            yield client
