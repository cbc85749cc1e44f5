"""`GET /v1/jobs/{id}/inputs`: a job's inputs as submitted, paged as its results are.

The app runs in-process behind `httpx.ASGITransport` with API keys on (alice,
bob and an admin), and an in-process worker with a fake embedder finishes
the jobs. Chunks hold 4 inputs, so pages and cursors fall inside chunks too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from pipeline.keys import Keys
from pipeline.settings import Settings
from pipeline.store.connections import connect
from tests.support.fakes import HashEmbedder
from tests.support.rest import assert_error, serving
from tests.support.workers import running

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
ALICE, BOB, ADMIN = "alice-key", "bob-key", "admin-key"
AS_ALICE = {"Authorization": f"Bearer {ALICE}"}
AS_BOB = {"Authorization": f"Bearer {BOB}"}
AS_ADMIN = {"X-API-Key": ADMIN}
INPUTS: list[Any] = [
    "plain text zero",
    {"id": "doc-1", "text": "text one", "metadata": {"page": 1, "tags": ["a"]}},
    {"id": "doc-2", "text": "text two"},
    "plain text three",
    {"text": "text four", "metadata": {"lang": "en"}},
    *[f"plain text {i}" for i in range(5, 10)],
]


def expected(index: int) -> dict[str, Any]:
    raw = INPUTS[index]
    if isinstance(raw, str):
        return {"index": index, "id": None, "text": raw, "metadata": None}
    return {"index": index, "id": raw.get("id"), "text": raw["text"],
            "metadata": raw.get("metadata")}


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(api_keys=(ALICE, BOB), admin_keys=(ADMIN,), block_ms=100,
                            chunk_size=4, fast_lane_max_texts=4,
                            heartbeat_interval_s=0.2, heartbeat_ttl_s=2.0)


@pytest.fixture
async def client(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(api_settings) as http:
        yield http


@pytest.fixture
async def job_id(api_settings: Settings, client: httpx.AsyncClient) -> str:
    """A completed job of alice's, with the ten INPUTS."""
    async with running(api_settings, HashEmbedder(api_settings)):
        reply = await client.post("/v1/jobs", json={"inputs": INPUTS}, headers=AS_ALICE)
        assert reply.status_code == 202, reply.text
        job: str = reply.json()["id"]
        with anyio.fail_after(15):
            while (await client.get(f"/v1/jobs/{job}", headers=AS_ALICE)
                   ).json()["status"] != "completed":
                await anyio.sleep(0.02)
    return job


async def all_pages(client: httpx.AsyncClient, job_id: str, limit: int
                    ) -> list[dict[str, Any]]:
    """Every page from the start, following next_cursor; each page is full but the last."""
    pages: list[dict[str, Any]] = []
    cursor = ""
    while True:
        reply = await client.get(f"/v1/jobs/{job_id}/inputs",
                                 params={"cursor": cursor, "limit": limit}, headers=AS_ALICE)
        assert reply.status_code == 200, reply.text
        pages.append(reply.json())
        if pages[-1]["next_cursor"] is None:
            return pages
        cursor = pages[-1]["next_cursor"]


async def test_a_finished_jobs_inputs_come_back_in_order_with_id_text_and_metadata(
    client: httpx.AsyncClient, job_id: str
) -> None:
    reply = await client.get(f"/v1/jobs/{job_id}/inputs", headers=AS_ALICE)
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"inputs": [expected(i) for i in range(len(INPUTS))],
                            "next_cursor": None}
    as_admin = await client.get(f"/v1/jobs/{job_id}/inputs", headers=AS_ADMIN)
    assert as_admin.json() == reply.json()


@pytest.mark.parametrize("limit", [1, 3, 4, 7])
async def test_pages_follow_the_cursor_and_the_limit(
    client: httpx.AsyncClient, job_id: str, limit: int
) -> None:
    pages = await all_pages(client, job_id, limit)
    assert [len(page["inputs"]) for page in pages[:-1]] == [limit] * (len(pages) - 1)
    assert [row for page in pages for row in page["inputs"]] == [
        expected(i) for i in range(len(INPUTS))]
    assert [page["next_cursor"] for page in pages[:-1]] == [
        str(limit * (n + 1)) for n in range(len(pages) - 1)]
    results = await client.get(f"/v1/jobs/{job_id}/results", params={"limit": limit},
                               headers=AS_ALICE)
    assert results.json()["next_cursor"] == pages[0]["next_cursor"], "the results' cursor"


async def test_an_input_whose_chunk_expired_is_left_out_and_the_page_reads_on(
    api_settings: Settings, client: httpx.AsyncClient, job_id: str
) -> None:
    assert api_settings.redis_url
    redis = connect(api_settings.redis_url)
    try:
        assert await redis.hdel(KEYS.inputs(job_id), "1") == 1  # inputs 4..7
    finally:
        await redis.aclose()
    page = (await client.get(f"/v1/jobs/{job_id}/inputs", params={"cursor": "2", "limit": 4},
                             headers=AS_ALICE)).json()
    assert page == {"inputs": [expected(2), expected(3), expected(8), expected(9)],
                    "next_cursor": None}
    page = (await client.get(f"/v1/jobs/{job_id}/inputs", params={"cursor": "5", "limit": 1},
                             headers=AS_ALICE)).json()
    assert page == {"inputs": [expected(8)], "next_cursor": "9"}


async def test_another_tenants_key_gets_404_as_for_a_job_that_does_not_exist(
    client: httpx.AsyncClient, job_id: str
) -> None:
    theirs = await client.get(f"/v1/jobs/{job_id}/inputs", headers=AS_BOB)
    error = assert_error(theirs, 404)
    unknown = await client.get(f"/v1/jobs/{'0' * 32}/inputs", headers=AS_BOB)
    assert assert_error(unknown, 404) == error | {"message": error["message"].replace(
        job_id, "0" * 32)}
    assert_error(await client.get(f"/v1/jobs/{job_id}/inputs"), 401)


@pytest.mark.parametrize("query,words", [
    ({"cursor": "abc"}, ["cursor"]),
    ({"cursor": "-1"}, ["cursor"]),
    ({"cursor": "²"}, ["cursor"]),
    ({"cursor": "11"}, ["cursor"]),
    ({"limit": "0"}, ["limit"]),
    ({"limit": "1001"}, ["limit"]),
    ({"limit": "ten"}, ["limit"]),
])
async def test_a_malformed_cursor_or_limit_is_a_400(
    client: httpx.AsyncClient, job_id: str, query: dict[str, str], words: list[str]
) -> None:
    reply = await client.get(f"/v1/jobs/{job_id}/inputs", params=query, headers=AS_ALICE)
    assert_error(reply, 400, None, *words)
