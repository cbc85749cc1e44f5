"""Slow clients cannot hold the server: a real `embedstream serve`, raw sockets as clients.

Slow-header senders (slowloris) are answered 408 and closed once
`http_header_timeout_s` passes, while /healthz keeps answering; idle
keep-alive connections close after `http_keepalive_s`; oversized headers are
refused; past `http_max_connections` a request is answered 503; and an SSE
stream outlives every one of these timeouts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from embedstream.processes import MAX_HEADER_BYTES, server_config
from pipeline.settings import Settings
from pipeline.store.embedded import EmbeddedRedis
from tests.conftest import flushed
from tests.support.processes import start_server

HEADER_TIMEOUT_S = 2.0
KEEPALIVE_S = 1.0
MAX_CONNECTIONS = 400
SLOW_CLIENTS = 300
PROBE_LIMIT_S = 1.0


@pytest.fixture(scope="module")
def base(valkey_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[str]:
    """One server for the module, with short timeouts and SSE pings every second."""
    process, url = start_server(
        flushed(valkey_server.url), tmp_path_factory.mktemp("slow"),
        EMBEDSTREAM_HTTP_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        EMBEDSTREAM_HTTP_KEEPALIVE_S=str(KEEPALIVE_S),
        EMBEDSTREAM_HTTP_MAX_CONNECTIONS=str(MAX_CONNECTIONS), EMBEDSTREAM_SSE_PING_S="1")
    try:
        yield url
    finally:
        process.stop()


def address(base: str) -> tuple[str, int]:
    host, port = base.removeprefix("http://").split(":")
    return host, int(port)


async def trickle(base: str) -> tuple[float, bytes]:
    """Send a request head one byte a second; (seconds until the server closed, its reply)."""
    reader, writer = await asyncio.open_connection(*address(base))
    opened = time.monotonic()
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"z" * 60
    try:
        for byte in head:
            writer.write(bytes([byte]))
            await writer.drain()
            try:  # read(n), not read(): a timeout inside read() drops the blocks it has read
                first = await asyncio.wait_for(reader.read(65536), 1.0)
            except TimeoutError:
                continue
            closed = time.monotonic() - opened
            return closed, first + await asyncio.wait_for(reader.read(), 5)
        raise AssertionError("the server never closed a slow connection")
    except ConnectionError:
        return time.monotonic() - opened, b""
    finally:
        writer.close()


async def probe(base: str, until: float) -> list[float]:
    """/healthz latencies, one request every 100 ms until `until`."""
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        while time.monotonic() < until:
            started = time.monotonic()
            assert (await client.get("/healthz")).status_code == 200
            latencies.append(time.monotonic() - started)
            await asyncio.sleep(0.1)
    return latencies


@pytest.mark.anyio
async def test_slow_header_senders_are_closed_after_the_header_timeout_while_healthz_answers(
        base: str) -> None:
    until = time.monotonic() + HEADER_TIMEOUT_S + 1.5
    with anyio.fail_after(HEADER_TIMEOUT_S + 20):
        slow = asyncio.gather(*(trickle(base) for _ in range(SLOW_CLIENTS)))
        latencies = await probe(base, until)
        closed = await slow
    assert max(latencies) < PROBE_LIMIT_S, max(latencies)
    assert len(latencies) >= 10
    seconds = [s for s, _ in closed]
    assert min(seconds) > HEADER_TIMEOUT_S - 0.5 and max(seconds) < HEADER_TIMEOUT_S + 3
    odd = [(round(s, 2), reply) for s, reply in closed if not reply.startswith(b"HTTP/1.1 408")]
    assert not odd, odd


async def write_past_the_timeout(base: str) -> bytes:
    """Send a head a byte every 20 ms, past the header timeout, and only then read."""
    reader, writer = await asyncio.open_connection(*address(base))
    until = time.monotonic() + HEADER_TIMEOUT_S + 0.5
    try:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"z" * 500:
            if time.monotonic() > until:
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.02)
        return await asyncio.wait_for(reader.read(), 3)
    except ConnectionError as exc:
        return repr(exc).encode()
    finally:
        writer.close()


@pytest.mark.anyio
async def test_a_client_still_writing_its_head_reads_the_408_instead_of_a_reset(
        base: str) -> None:
    """Bytes arriving after the 408 must not reset the connection before the client reads it."""
    replies = await asyncio.gather(*(write_past_the_timeout(base) for _ in range(5)))
    assert all(reply.startswith(b"HTTP/1.1 408") for reply in replies), replies


@pytest.mark.anyio
async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive(base: str) -> None:
    reader, writer = await asyncio.open_connection(*address(base))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    started = time.monotonic()
    with anyio.fail_after(KEEPALIVE_S + 5):
        reply = await reader.read()  # the response, then the end once the keep-alive lapses
    assert reply.startswith(b"HTTP/1.1 200")
    assert KEEPALIVE_S - 0.3 < time.monotonic() - started < KEEPALIVE_S + 3
    writer.close()


@pytest.mark.anyio
async def test_request_headers_over_the_limit_are_refused(base: str) -> None:
    reader, writer = await asyncio.open_connection(*address(base))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
                 + b"a" * (MAX_HEADER_BYTES + 1024))  # not yet complete: h11 counts it
    await writer.drain()
    with anyio.fail_after(5):
        assert (await reader.read()).startswith(b"HTTP/1.1 400")
    writer.close()
    async with httpx.AsyncClient(base_url=base) as client:
        assert (await client.get("/healthz", headers={"x-ok": "a" * 4000})).status_code == 200


@pytest.mark.anyio
async def test_past_the_connection_limit_a_request_is_answered_503(base: str) -> None:
    held = [await asyncio.open_connection(*address(base)) for _ in range(MAX_CONNECTIONS)]
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            assert (await client.get("/healthz")).status_code == 503
    finally:
        for _, writer in held:
            writer.close()
    async with httpx.AsyncClient(base_url=base) as client:
        with anyio.fail_after(10):
            while (await client.get("/healthz")).status_code != 200:
                await asyncio.sleep(0.1)


@pytest.mark.anyio
async def test_an_event_stream_outlives_the_header_and_keepalive_timeouts(base: str) -> None:
    lines = 0
    async with httpx.AsyncClient(base_url=base, timeout=10) as client, \
            client.stream("GET", "/v1/events") as response:
        assert response.status_code == 200
        started = time.monotonic()
        async for _ in response.aiter_lines():
            lines += 1
            if time.monotonic() - started > HEADER_TIMEOUT_S + KEEPALIVE_S + 1:
                break
    assert lines >= 2  # pings kept arriving past both timeouts


def test_the_server_is_configured_with_the_settings_bounds(tmp_path: Path) -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1", data_dir=tmp_path,
                        http_keepalive_s=7.5, http_max_connections=123)
    config = server_config(object(), settings, "warning")
    assert config.timeout_keep_alive == 7.5 and config.limit_concurrency == 123
    assert config.h11_max_incomplete_event_size == MAX_HEADER_BYTES
