"""Redis stopping under a running app: every call answers 503 with Retry-After, never 500.

The app gets a Valkey of its own, started for the test and stopped in the
middle of it; Redis connection and timeout errors become `Unavailable` in one
place (`Pipeline`, through `pipeline.store.connections.redis_outage`).
"""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mcp_server.app import create_app
from mcp_server.tools import tool_errors
from pipeline.service import Pipeline
from pipeline.settings import Settings
from pipeline.store.embedded import EmbeddedRedis

pytestmark = pytest.mark.anyio


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis", binary="valkey") as server:
        yield server


async def test_a_stopped_redis_answers_503_with_retry_after_on_every_route(
    own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    settings = Settings(redis_url=own_redis.url, data_dir=tmp_path / "data")
    app = create_app(settings, with_mcp=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            created = await client.post("/v1/jobs", json={"inputs": ["hello"]})
            assert created.status_code == 202, created.text
            job_id = created.json()["id"]
            own_redis.stop()
            calls = [("POST", "/v1/jobs", {"inputs": ["again"]}),
                     ("GET", f"/v1/jobs/{job_id}", None),
                     ("GET", f"/v1/jobs/{job_id}/results", None),
                     ("DELETE", f"/v1/jobs/{job_id}", None),
                     ("GET", f"/v1/jobs/{job_id}/events", None),
                     ("POST", "/v1/embeddings", {"input": ["x"]}),
                     ("GET", "/readyz", None)]
            for method, path, body in calls:
                reply = await client.request(method, path, json=body)
                assert reply.status_code == 503, (method, path, reply.text)
                if path != "/readyz":
                    assert reply.json()["error"]["code"] == "unavailable", (method, path)
                    assert int(reply.headers["retry-after"]) > 0, (method, path)
                    assert "Redis" in reply.json()["error"]["message"]


async def test_an_mcp_tool_reports_a_stopped_redis_as_a_tool_error(
    own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    from mcp.server.mcpserver.exceptions import ToolError

    pipeline = Pipeline(Settings(redis_url=own_redis.url, data_dir=tmp_path / "data"))
    try:
        own_redis.stop()

        @tool_errors
        async def job_status() -> object:
            return await pipeline.job("a" * 32)

        with pytest.raises(ToolError, match=r"^unavailable: Redis is unreachable"):
            await job_status()
    finally:
        await pipeline.close()
