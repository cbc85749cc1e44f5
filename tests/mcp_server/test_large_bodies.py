"""Large JSON job bodies: counted before any input is validated, parsed off the event loop,
and held in memory about once, so other requests keep being answered."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from mcp_server.payloads import ParsedInputs
from pipeline.settings import Settings
from pipeline.store.embedded import EmbeddedRedis
from tests.conftest import flushed
from tests.support.processes import start_server
from tests.support.rest import assert_error, serving

MAX_INPUTS = 200_000
PROBE_LIMIT_S = 1.0


@pytest.fixture(scope="module")
def server(valkey_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[int, str]]:
    """A real `embedstream serve` (its pid and URL) taking jobs of up to MAX_INPUTS inputs."""
    process, url = start_server(flushed(valkey_server.url), tmp_path_factory.mktemp("big"),
                                EMBEDSTREAM_MAX_INPUTS=str(MAX_INPUTS),
                                EMBEDSTREAM_MAX_BACKLOG="0")
    try:
        yield process.popen.pid, url
    finally:
        process.stop()


def memory_mib(pid: int, field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for {pid}")


def post_while_probing(url: str, body: bytes) -> tuple[httpx.Response, float]:
    """POST /v1/jobs with `body`; (its response, the slowest /healthz meanwhile)."""
    done = threading.Event()
    slowest = [0.0]

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not done.is_set():
                started = time.monotonic()
                assert client.get("/healthz").status_code == 200
                slowest[0] = max(slowest[0], time.monotonic() - started)
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        response = httpx.post(f"{url}/v1/jobs", content=body, timeout=120,
                              headers={"content-type": "application/json"})
    finally:
        done.set()
        prober.join()
    return response, slowest[0]


def test_a_body_over_max_inputs_is_refused_without_stalling_or_swelling_the_server(
        server: tuple[int, str]) -> None:
    pid, url = server
    body = orjson.dumps({"inputs": [f"text {i:09d}" for i in range(2_000_000)]})  # 30 MiB
    before = memory_mib(pid, "VmRSS")
    response, slowest = post_while_probing(url, body)
    assert_error(response, 413, None, f"at most {MAX_INPUTS}", "EMBEDSTREAM_MAX_INPUTS")
    assert slowest < PROBE_LIMIT_S, slowest
    # Parsed, a short string costs about 4 times its JSON (a 64-byte str and a pointer), and
    # the body itself is held until it is parsed: about 7 times in all, 14 when each input
    # also became an Item before the count was checked.
    grown = memory_mib(pid, "VmHWM") - before
    assert grown < 10 * len(body) / 2**20, (grown, len(body))


def test_a_large_accepted_body_leaves_healthz_answering(server: tuple[int, str]) -> None:
    _, url = server
    body = orjson.dumps({"inputs": [{"id": f"i{i}", "text": f"text {i:09d}"}
                                    for i in range(MAX_INPUTS)]})
    response, slowest = post_while_probing(url, body)
    assert response.status_code == 202, response.text
    assert response.json()["total"] == MAX_INPUTS
    assert slowest < PROBE_LIMIT_S, slowest


@pytest.mark.anyio
async def test_inputs_over_max_inputs_are_413_before_any_input_is_validated(
        settings: Settings) -> None:
    small = Settings(**{**settings.__dict__, "max_inputs": 3})
    async with serving(small) as client:
        response = await client.post("/v1/jobs", json={"inputs": [42, "", "b", "c"]})
        assert_error(response, 413, None, "at most 3", "has 4", "EMBEDSTREAM_MAX_INPUTS")
        response = await client.post("/v1/jobs", json={"inputs": ["a", 42, "c"]})
        assert_error(response, 422, None, "inputs[1]")


def test_parsed_inputs_are_released_as_they_are_taken() -> None:
    raw: list[object] = ["a", {"text": "b", "id": "x"}, "c"]
    inputs = ParsedInputs(raw, max_chars=10)
    assert len(inputs) == 3
    taken = iter(inputs)
    assert next(taken).text == "a" and len(raw) == 2
    second = next(taken)
    assert (second.text, second.id) == ("b", "x") and raw == ["c"]
    assert [item.text for item in taken] == ["c"] and raw == []
