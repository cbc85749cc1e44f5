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

from mcp_server.json_lists import SLICE, TooMany, parse_object
from mcp_server.payloads import ParsedInputs
from pipeline import InvalidRequest
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


def test_a_large_body_of_objects_is_held_about_twice_and_leaves_healthz_answering(
        server: tuple[int, str]) -> None:
    pid, url = server
    body = orjson.dumps({"inputs": [{"id": f"i{i}", "text": f"text {i:09d}",
                                     "metadata": {"source": "upload", "n": i}}
                                    for i in range(MAX_INPUTS)], "chunk": False})  # 18.6 MiB
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM from here on
    before = memory_mib(pid, "VmRSS")
    response, slowest = post_while_probing(url, body)
    assert response.status_code == 202, response.text
    assert response.json()["total"] == MAX_INPUTS
    assert slowest < PROBE_LIMIT_S, slowest
    # The body's bytes and its text, briefly both; then the text and a slice of inputs.
    # Parsed whole, these objects cost 14 times their JSON.
    grown = memory_mib(pid, "VmHWM") - before
    print(f"{len(body) / 2**20:.1f} MiB of objects: +{grown:.0f} MiB, "
          f"/healthz at worst {slowest * 1000:.0f} ms")
    assert grown < 4 * len(body) / 2**20, (grown, len(body))


@pytest.mark.anyio
async def test_inputs_over_max_inputs_are_413_before_any_input_is_validated(
        settings: Settings) -> None:
    small = Settings(**{**settings.__dict__, "max_inputs": 3})
    async with serving(small) as client:
        response = await client.post("/v1/jobs", json={"inputs": [42, "", "b", "c"]})
        assert_error(response, 413, None, "at most 3", "has more", "EMBEDSTREAM_MAX_INPUTS")
        response = await client.post("/v1/jobs", json={"inputs": ["a", 42, "c"]})
        assert_error(response, 422, None, "inputs[1]")


def test_parsed_inputs_are_decoded_a_slice_at_a_time() -> None:
    raw = [f"text {i}" if i % 2 else {"text": f"text {i}", "id": f"x{i}"}
           for i in range(2 * SLICE + 3)]
    body = parse_object(orjson.dumps({"model": "m", "inputs": raw, "chunk": True}),
                        "inputs", 10**6)
    assert body.fields == {"model": "m", "chunk": True} and body.count == len(raw)
    assert len(body.slices) == 3  # the text is kept, not the elements
    inputs = ParsedInputs(body, max_chars=100)
    assert len(inputs) == len(raw)
    taken = list(inputs)
    assert [item.text for item in taken] == [f"text {i}" for i in range(len(raw))]
    assert taken[2].id == "x2" and body.text == ""  # taken once; the text let go


@pytest.mark.parametrize("body, message", [
    (b'{"inputs": ["a", "b",]}', "line 1"),
    (b'{"inputs": ["a"]} trailing', "extra data"),
    (b'["a"]', "must be a JSON object"),
    (b'{"inputs" ["a"]}', "expected ':'"),
    (b'{"model": NaN, "inputs": ["a"]}', "malformed JSON"),
    (b'{"inputs": ["a"], "model": "\xff"}', "invalid UTF-8"),
    (b'{"inputs": ["a" "b"]}', "',' or ']'"),
])
def test_malformed_bodies_are_named(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_object(body, "inputs", 10)
    assert message in caught.value.message, caught.value.message


def test_the_walk_stops_past_the_limit() -> None:
    with pytest.raises(TooMany):
        parse_object(b'{"inputs": ["a", "b", "c", {"not": "read"}', "inputs", 3)


def test_the_last_of_a_repeated_field_counts() -> None:
    body = parse_object(b'{"inputs": ["a", "b"], "inputs": "x"}', "inputs", 10)
    assert not body.listed and body.fields["inputs"] == "x"
    body = parse_object(b'{"inputs": "x", "inputs": ["a"]}', "inputs", 10)
    assert body.listed and body.count == 1 and "inputs" not in body.fields
