"""Browser-safe defaults: Host and Origin checks on every route, typed bodies, limits while reading.

A DNS-rebinding page reaches the server under the attacker's host name; a
cross-site page sends its own Origin, and can only send `text/plain`, form
or multipart bodies without a CORS preflight. None of them may read or
create anything. Bodies are limited as they stream in, so a chunked upload
with no Content-Length cannot go past the limit either.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from mcp_server.payloads import LineSplitter, ndjson_values
from pipeline.errors import PayloadTooLarge
from pipeline.settings import Settings
from pipeline.store.connections import connect
from tests.support.rest import serving

pytestmark = pytest.mark.anyio

JOB = "0" * 32
ROUTES = [("GET", "/v1/events"), ("GET", f"/v1/jobs/{JOB}/results"),
          ("GET", f"/v1/jobs/{JOB}/events"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs"),
          ("GET", "/"), ("GET", "/metrics"), ("POST", "/v1/embeddings"),
          ("DELETE", f"/v1/jobs/{JOB}"), ("POST", "/v1/session")]
BODY = b'{"inputs": ["a"]}'


def serving_on(settings: Settings) -> contextlib.AbstractAsyncContextManager[httpx.AsyncClient]:
    """The app in-process, reached as 127.0.0.1:8000 (the Host the checks see)."""
    return serving(settings, base_url="http://127.0.0.1:8000")


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serving_on(settings.replace(max_upload_bytes=4096, max_json_bytes=4096)) as http:
        yield http


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Any]:
    assert settings.redis_url
    raw = connect(settings.redis_url)
    try:
        yield raw
    finally:
        await raw.aclose()


async def nothing_stored(redis: Any) -> bool:
    return [key async for key in redis.scan_iter(count=1000)] == []


@pytest.mark.parametrize("method,path", ROUTES)
async def test_a_rebinding_host_is_421_on_every_route(
    client: httpx.AsyncClient, redis: Any, method: str, path: str
) -> None:
    reply = await client.request(method, path, content=BODY, headers={
        "host": "attacker.example", "content-type": "application/json"})
    assert reply.status_code == 421, reply.text
    assert reply.json()["error"]["code"] == "invalid_host"
    assert "EMBEDSTREAM_ALLOWED_HOSTS" in reply.json()["error"]["message"]
    assert await nothing_stored(redis)


@pytest.mark.parametrize("method,path", ROUTES)
async def test_a_foreign_origin_is_403_on_every_route(
    client: httpx.AsyncClient, redis: Any, method: str, path: str
) -> None:
    reply = await client.request(method, path, content=BODY, headers={
        "origin": "https://attacker.example", "content-type": "application/json"})
    assert reply.status_code == 403, reply.text
    assert reply.json()["error"]["code"] == "invalid_origin"
    assert await nothing_stored(redis)


async def test_probes_answer_any_host_so_orchestrators_can_reach_them(
    client: httpx.AsyncClient
) -> None:
    assert (await client.get("/healthz", headers={"host": "10.0.0.7:8000"})).status_code == 200


async def test_a_configured_host_and_its_own_origin_are_allowed(settings: Settings) -> None:
    async with serving_on(settings.replace(allowed_hosts=("embed.example.com",))) as http:
        reply = await http.get("/v1/jobs", headers={"host": "embed.example.com",
                                                    "origin": "https://embed.example.com"})
        assert reply.status_code == 200, reply.text


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "text/json"])
@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/embeddings", "/v1/session"])
async def test_a_body_without_a_json_content_type_is_415(
    client: httpx.AsyncClient, redis: Any, content_type: str | None, path: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    reply = await client.post(path, content=BODY, headers=headers)
    assert reply.status_code == 415, reply.text
    assert reply.json()["error"]["code"] == "unsupported_media_type"
    assert await nothing_stored(redis)


async def chunks(total: int, line: bytes) -> AsyncIterator[bytes]:
    """`total` bytes of repeated lines, in pieces, with no Content-Length."""
    sent = 0
    while sent < total:
        yield line
        sent += len(line)


@pytest.mark.parametrize("content_type,line", [
    ("application/x-ndjson", b'"a text of a few words"\n'),
    ("application/json", b'{"inputs": ["' + b"x" * 100 + b'"]}'),
])
async def test_a_chunked_body_past_the_limit_is_413_and_queues_nothing(
    client: httpx.AsyncClient, redis: Any, content_type: str, line: bytes
) -> None:
    reply = await client.post("/v1/jobs", content=chunks(10_000, line),
                              headers={"content-type": content_type})
    assert reply.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in reply.request.headers
    assert reply.status_code == 413, reply.text
    assert "4096" in reply.json()["error"]["message"]
    assert await nothing_stored(redis)


async def test_a_declared_length_past_the_limit_is_413_before_reading(
    client: httpx.AsyncClient, redis: Any
) -> None:
    reply = await client.post("/v1/jobs", content=b"x" * 5000,
                              headers={"content-type": "application/json"})
    assert reply.status_code == 413
    assert await nothing_stored(redis)


async def test_cors_is_off_unless_origins_are_configured(settings: Settings) -> None:
    preflight = {"origin": "https://app.example.com", "access-control-request-method": "POST",
                 "access-control-request-headers": "authorization,content-type"}
    configured = settings.replace(cors_origins=("https://app.example.com",))
    async with serving_on(settings) as http:
        reply = await http.options("/v1/jobs", headers=preflight)
        assert reply.status_code == 403  # a foreign origin, and no CORS
        assert "access-control-allow-origin" not in reply.headers
    async with serving_on(configured) as http:
        reply = await http.options("/v1/jobs", headers=preflight)
        assert reply.status_code == 200
        assert reply.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "access-control-allow-credentials" not in reply.headers


def trickling_request(body: bytes, piece_bytes: int) -> Request:
    """A request whose body arrives `piece_bytes` at a time."""
    pieces = iter([body[i:i + piece_bytes] for i in range(0, len(body), piece_bytes)])

    async def receive() -> dict[str, Any]:
        piece = next(pieces, None)
        return {"type": "http.request", "body": piece or b"", "more_body": piece is not None}

    return Request({"type": "http", "method": "POST", "headers": []}, receive)


async def test_ndjson_lines_trickled_in_small_pieces_parse_with_their_line_numbers() -> None:
    body = b'"one"\n\n{"text": "two"}\r\n"' + b"w" * 5000 + b'"\n"last"'
    values = [value async for value in ndjson_values(trickling_request(body, 3))]
    assert values == [(1, "one"), (3, {"text": "two"}), (4, "w" * 5000), (5, "last")]


def test_line_splitting_stays_linear_when_bytes_arrive_one_at_a_time() -> None:
    splitter = LineSplitter()
    line = b"x" * 400_000
    lines: list[bytes] = []
    started = time.monotonic()
    for i in range(len(line)):
        lines += splitter.feed(line[i:i + 1])
    lines += splitter.feed(b"\nnext")
    # Generous: re-splitting the pending line at each byte would copy ~80 GB here.
    assert time.monotonic() - started < 20
    assert lines == [line] and splitter.rest() == b"next" and splitter.lines == 1


def test_a_line_over_the_line_limit_is_refused_while_it_arrives() -> None:
    splitter = LineSplitter(max_line_bytes=1000)
    splitter.feed(b"a\n" + b"y" * 1000)
    with pytest.raises(PayloadTooLarge, match="line 2"):
        splitter.feed(b"y")


@pytest.mark.parametrize("model", ["/", "/etc", "~", "~/", ".", "..", "/tmp/../etc"])
async def test_a_model_name_never_probes_the_filesystem_or_echoes_a_path(
    client: httpx.AsyncClient, redis: Any, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    probed: list[str] = []
    real_is_dir = Path.is_dir

    def spy(path: Path) -> bool:
        probed.append(str(path))
        return real_is_dir(path)

    monkeypatch.setattr(Path, "is_dir", spy)
    reply = await client.post("/v1/jobs", json={"inputs": ["a"], "model": model})
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"]["code"] == "unknown_model"
    assert not any(p in (model, str(Path(model).expanduser())) for p in probed), probed
    assert str(Path.home()) not in reply.text and "/root" not in reply.text
    assert await nothing_stored(redis)
