"""The REST API in-process: every bad input is a 4xx that names the problem and queues nothing.

The app runs inside its own lifespan behind `httpx.ASGITransport`; tests that
need results run an in-process worker with a fake embedder that reports the
default model's name and shape, so the server's validation is the real one.
"""

import asyncio
import base64
import json
import random
import re
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

from pipeline.keys import Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.settings import Settings
from pipeline.store.connections import connect
from tests.support.fakes import HashEmbedder, expected_vector, token_count
from tests.support.rest import assert_error, parse_sse, serving, submit, wait_done
from workers.worker import Worker

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
QUEUES = KEYS.queues(DEFAULT_MODEL)
DIMS = 384
JOB_KEY = re.compile(rb"^es:\{[0-9a-f]{32}\}:")
UNKNOWN_JOB = "0" * 32
NDJSON = {"content-type": "application/x-ndjson"}
STATUS_FIELDS = {"id", "status", "total", "done", "failed", "model", "dimensions",
                 "created_at", "started_at", "finished_at", "error", "backend"}


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.replace(block_ms=100, chunk_size=4, fast_lane_max_texts=4,
                            batch_max_texts=16, max_text_chars=2000, max_inputs=50,
                            heartbeat_interval_s=0.2, heartbeat_ttl_s=2.0)


@pytest.fixture
async def client(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(api_settings) as http:
        yield http


@pytest.fixture
async def redis(api_settings: Settings) -> AsyncIterator[Any]:
    assert api_settings.redis_url
    raw = connect(api_settings.redis_url)
    try:
        yield raw
    finally:
        await raw.aclose()


@pytest.fixture
async def worker(api_settings: Settings) -> AsyncIterator[Worker]:
    """A registered in-process worker embedding with HashEmbedder."""
    async with Worker.start(api_settings, HashEmbedder(api_settings)) as running:
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(running.run(stop, ready))
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({task, waiting}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if task.done():
            task.result()
        try:
            yield running
        finally:
            stop.set()
            with anyio.fail_after(10):
                await task


async def assert_nothing_queued(redis: Any) -> None:
    """No job record, inputs or idempotency key was left, and both lanes are empty."""
    leftovers = [k async for k in redis.scan_iter(count=1000)
                 if JOB_KEY.match(k) or k.startswith(b"es:idem:")]
    assert leftovers == []
    for stream in QUEUES:
        assert await redis.xlen(stream) == 0


def texts(n: int, prefix: str = "text") -> list[str]:
    return [f"{prefix} number {i}" for i in range(n)]


# Submitting: bad inputs


@pytest.mark.parametrize("body,status,words", [
    ({"inputs": []}, 422, ["empty"]),
    ({}, 422, ["'inputs'"]),
    ({"inputs": "just one text"}, 422, ["'inputs'", "list"]),
    ({"inputs": None}, 422, ["'inputs'"]),
    ({"inputs": [""]}, 422, ["inputs[0]", "empty"]),
    ({"inputs": ["fine", "  \t\n "]}, 422, ["inputs[1]", "whitespace"]),
    ({"inputs": ["fine", {"text": ""}]}, 422, ["inputs[1]"]),
    ({"inputs": [5]}, 422, ["inputs[0]", "a number"]),
    ({"inputs": ["fine", None]}, 422, ["inputs[1]", "null"]),
    ({"inputs": [["nested"]]}, 422, ["inputs[0]", "an array"]),
    ({"inputs": [{"text": 5}]}, 422, ["inputs[0]", "must be a string"]),
    ({"inputs": [{"id": "x"}]}, 422, ["inputs[0]", "no 'text'"]),
    ({"inputs": ["a"], "colour": "red"}, 422, ["colour"]),
    ({"inputs": [{"text": "a", "vector": [1]}]}, 422, ["inputs[0]", "vector"]),
    ({"inputs": [{"text": "a", "metadata": "x"}]}, 422, ["inputs[0].metadata"]),
    ({"inputs": [{"text": "a", "id": 7}]}, 422, ["inputs[0].id"]),
    ({"inputs": [{"text": "a", "id": "i" * 257}]}, 422, ["inputs[0].id"]),
    ({"inputs": ["x" * 2001]}, 422, ["inputs[0]", "2001", "2000"]),
    ({"inputs": ["a"], "dimensions": 0}, 422, ["'dimensions'"]),
    ({"inputs": ["a"], "dimensions": -1}, 422, ["'dimensions'"]),
    ({"inputs": ["a"], "dimensions": 385}, 422, ["'dimensions'", "384"]),
    ({"inputs": ["a"], "dimensions": 8.5}, 422, ["'dimensions'"]),
    ({"inputs": ["a"], "dimensions": "8"}, 422, ["'dimensions'"]),
    ({"inputs": ["a"], "dimensions": True}, 422, ["'dimensions'"]),
    ({"inputs": ["a"], "normalize": "yes"}, 422, ["'normalize'"]),
    ({"inputs": ["a"], "truncate": 0}, 422, ["'truncate'"]),
    ({"inputs": ["a"], "model": ""}, 422, ["'model'"]),
    ({"inputs": ["a"], "model": 3}, 422, ["'model'"]),
])
async def test_a_bad_json_submission_is_a_4xx_naming_the_problem(
    client: httpx.AsyncClient, redis: Any, body: dict[str, Any], status: int, words: list[str]
) -> None:
    response = await client.post("/v1/jobs", json=body)
    assert_error(response, status, None, *words)
    await assert_nothing_queued(redis)


async def test_an_unknown_model_is_rejected(client: httpx.AsyncClient, redis: Any) -> None:
    response = await client.post("/v1/jobs", json={"inputs": ["a"], "model": "no-such-model"})
    assert_error(response, 422, "unknown_model", "no-such-model", DEFAULT_MODEL)
    await assert_nothing_queued(redis)


async def test_too_many_inputs_are_refused_as_too_large(
    client: httpx.AsyncClient, redis: Any, api_settings: Settings
) -> None:
    inputs = texts(api_settings.max_inputs + 1)
    response = await client.post("/v1/jobs", json={"inputs": inputs})
    assert_error(response, 413, "payload_too_large", str(api_settings.max_inputs))
    await assert_nothing_queued(redis)
    ndjson = "\n".join(json.dumps(t) for t in inputs)
    response = await client.post("/v1/jobs", content=ndjson, headers=NDJSON)
    assert_error(response, 413, "payload_too_large")
    await assert_nothing_queued(redis)


@pytest.mark.parametrize("raw", [b'{"inputs": [', b"{inputs: []}", b'{"inputs": ["a",]}',
                                 b"", b"   ", b"[]", b'"inputs"', b"null", b"42",
                                 b'{"inputs": ["a"]} trailing', b'{"inputs": [NaN]}'])
async def test_a_body_that_is_not_a_json_object_is_a_400(
    client: httpx.AsyncClient, redis: Any, raw: bytes
) -> None:
    response = await client.post("/v1/jobs", content=raw,
                                 headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request")
    await assert_nothing_queued(redis)


@pytest.mark.parametrize("raw", [b'{"inputs": ["caf\xe9"]}', b'{"inputs": ["\xff\xfe"]}',
                                 b'{"inputs": ["\\ud800"]}', b'\xef\xbb\xbf{"inputs": ["a"]}'[3:]
                                 .replace(b"a", b"\xc3\x28")])
async def test_invalid_utf8_json_is_a_400(client: httpx.AsyncClient, redis: Any,
                                          raw: bytes) -> None:
    response = await client.post("/v1/jobs", content=raw,
                                 headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request", "malformed JSON")
    await assert_nothing_queued(redis)


async def test_invalid_utf8_in_an_ndjson_line_names_the_line(
    client: httpx.AsyncClient, redis: Any
) -> None:
    body = b'"fine"\n"also fine"\n"caf\xe9"\n'
    response = await client.post("/v1/jobs", content=body, headers=NDJSON)
    assert_error(response, 422, "invalid_input", "line 3")
    await assert_nothing_queued(redis)


async def test_a_malformed_ndjson_line_after_many_good_ones_leaves_nothing_behind(
    client: httpx.AsyncClient, redis: Any
) -> None:
    good = "\n".join(json.dumps(t) for t in texts(13))  # more than three chunks
    response = await client.post("/v1/jobs", content=good + "\n{not json}\n", headers=NDJSON)
    assert_error(response, 422, "invalid_input", "line 14")
    await assert_nothing_queued(redis)


@pytest.mark.parametrize("body,words", [
    (b'"a"\n""\n', ["inputs[1]", "empty"]),
    (b'"a"\n5\n', ["inputs[1]", "a number"]),
    (b'{"text": "a", "extra": 1}\n', ["inputs[0]", "extra"]),
    (b"", ["empty"]),
    (b"\n\n  \n", ["empty"]),
])
async def test_bad_ndjson_inputs_are_named(
    client: httpx.AsyncClient, redis: Any, body: bytes, words: list[str]
) -> None:
    response = await client.post("/v1/jobs", content=body, headers=NDJSON)
    assert_error(response, 422, "invalid_input", *words)
    await assert_nothing_queued(redis)


async def test_an_ndjson_error_names_the_input_index_and_the_line(
    client: httpx.AsyncClient, redis: Any
) -> None:
    body = b'"first"\n\n   \n{"text": "second"}\n\n""\n"never read"\n'
    response = await client.post("/v1/jobs", content=body, headers=NDJSON)
    error = assert_error(response, 422, "invalid_input", "line 6", "inputs[2]")
    assert error["index"] == 2
    await assert_nothing_queued(redis)


@pytest.mark.parametrize("query,word", [
    ("dimensions=0", "dimensions"), ("dimensions=-1", "dimensions"),
    ("dimensions=385", "dimensions"), ("dimensions=1.5", "dimensions"),
    ("normalize=maybe", "normalize"), ("colour=red", "colour"), ("model=nope", "nope"),
])
async def test_bad_ndjson_query_options_are_named(
    client: httpx.AsyncClient, redis: Any, query: str, word: str
) -> None:
    response = await client.post(f"/v1/jobs?{query}", content=b'"a"\n', headers=NDJSON)
    assert_error(response, 422, None, word)
    await assert_nothing_queued(redis)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml",
                                          "multipart/form-data; boundary=x",
                                          "application/x-www-form-urlencoded"])
async def test_an_unsupported_content_type_is_refused(
    client: httpx.AsyncClient, redis: Any, content_type: str
) -> None:
    response = await client.post("/v1/jobs", content=b'{"inputs": ["a"]}',
                                 headers={"content-type": content_type})
    error = assert_error(response, 415, "unsupported_media_type", "Content-Type")
    assert content_type.split(";")[0] in error["message"]
    await assert_nothing_queued(redis)


async def test_a_json_body_with_a_charset_parameter_is_accepted(
    client: httpx.AsyncClient
) -> None:
    response = await client.post("/v1/jobs", content=b'{"inputs": ["a"]}',
                                 headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 202


async def test_an_over_long_text_with_truncate_false_names_its_index(
    client: httpx.AsyncClient, redis: Any
) -> None:
    long_text = " ".join(["word"] * 300)  # about 300 word pieces; the model takes 256
    inputs = ["short", "short too", long_text, "fine", "fine", long_text]
    response = await client.post("/v1/jobs", json={"inputs": inputs, "truncate": False})
    error = assert_error(response, 422, "invalid_input", "index 2, 5", "256", "truncate")
    assert error["indexes"] == [2, 5]
    await assert_nothing_queued(redis)
    response = await client.post("/v1/jobs?truncate=false",
                                 content="\n".join(json.dumps(t) for t in inputs),
                                 headers=NDJSON)
    assert_error(response, 422, "invalid_input", "index 2, 5")
    await assert_nothing_queued(redis)


async def test_an_over_long_text_is_accepted_when_truncation_is_allowed(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    long_text = " ".join(["word"] * 300)
    job_id = await submit(client, ["short", long_text])
    await wait_done(client, job_id)
    rows = (await client.get(f"/v1/jobs/{job_id}/results")).json()["results"]
    assert [row["truncated"] for row in rows] == [False, True]


async def test_a_bad_idempotency_key_is_refused(client: httpx.AsyncClient, redis: Any) -> None:
    response = await client.post("/v1/jobs", json={"inputs": ["a"]},
                                 headers={"Idempotency-Key": "k" * 256})
    assert_error(response, 422, None, "Idempotency-Key")
    await assert_nothing_queued(redis)


async def test_a_rejected_submission_frees_its_idempotency_key(
    client: httpx.AsyncClient, redis: Any
) -> None:
    headers = {"Idempotency-Key": "retry-me"}
    response = await client.post("/v1/jobs", json={"inputs": [""]}, headers=headers)
    assert_error(response, 422)
    await assert_nothing_queued(redis)
    response = await client.post("/v1/jobs", json={"inputs": ["fixed"]}, headers=headers)
    assert response.status_code == 202


# Reading and cancelling: bad ids, cursors and parameters


BAD_JOB_IDS = ["abc", "A" * 32, "g" * 32, "0" * 33, "%2e%2e", "0" * 31 + "%0A",
               "0" * 32 + "%0A", "%00", "x" * 5000]


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
@pytest.mark.parametrize("method,suffix", [("GET", ""), ("GET", "/results"),
                                           ("GET", "/events"), ("DELETE", "")])
async def test_a_malformed_job_id_is_a_400(
    client: httpx.AsyncClient, method: str, suffix: str, job_id: str
) -> None:
    response = await client.request(method, f"/v1/jobs/{job_id}{suffix}")
    assert_error(response, 400, "invalid_job_id", "job id")


@pytest.mark.parametrize("method,suffix", [("GET", ""), ("GET", "/results"),
                                           ("GET", "/events"), ("DELETE", "")])
async def test_an_unknown_job_is_a_404(
    client: httpx.AsyncClient, method: str, suffix: str
) -> None:
    response = await client.request(method, f"/v1/jobs/{UNKNOWN_JOB}{suffix}")
    assert_error(response, 404, "job_not_found", UNKNOWN_JOB)


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", "4x", "\u00b2", "\u0661", "99",
                                    "1" * 30, "%00"])
async def test_a_malformed_cursor_is_a_400(client: httpx.AsyncClient, cursor: str) -> None:
    job_id = await submit(client, texts(3))
    response = await client.get(f"/v1/jobs/{job_id}/results?cursor={cursor}")
    assert_error(response, 400, "invalid_cursor", "cursor")


@pytest.mark.parametrize("limit", ["0", "-1", "1001", "abc", "1.5", "\u00b2", "9" * 30])
async def test_a_bad_limit_is_a_400(client: httpx.AsyncClient, limit: str) -> None:
    job_id = await submit(client, texts(3))
    response = await client.get(f"/v1/jobs/{job_id}/results", params={"limit": limit})
    assert_error(response, 400, None, "'limit'", "1000")


@pytest.mark.parametrize("encoding", ["hex", "FLOAT", "base-64", "float32"])
async def test_a_bad_encoding_is_a_400(client: httpx.AsyncClient, encoding: str) -> None:
    job_id = await submit(client, texts(3))
    response = await client.get(f"/v1/jobs/{job_id}/results", params={"encoding": encoding})
    assert_error(response, 400, None, "'encoding'")
    response = await client.get(f"/v1/jobs/{job_id}/events", params={"encoding": encoding})
    assert_error(response, 400, None, "'encoding'")


BAD_EVENT_IDS = ["abc", "1-", "-1", "1-2-3", "1.5", "\u0661-0", "99999999999999999999-0",
                 "1-0 x", "$", ">"]


@pytest.mark.parametrize("event_id", BAD_EVENT_IDS)
async def test_a_malformed_resume_id_is_a_400_before_any_stream_opens(
    client: httpx.AsyncClient, event_id: str
) -> None:
    job_id = await submit(client, texts(3))
    for path in (f"/v1/jobs/{job_id}/events", "/v1/events"):
        response = await client.get(path, headers={"Last-Event-ID": event_id.encode()})
        assert_error(response, 400, "invalid_cursor", "event id")
        response = await client.get(path, params={"after": event_id})
        assert_error(response, 400, "invalid_cursor", "event id")


@pytest.mark.parametrize("method,path", [
    ("PUT", "/v1/jobs"), ("DELETE", "/v1/jobs"),
    ("POST", f"/v1/jobs/{UNKNOWN_JOB}"), ("PATCH", f"/v1/jobs/{UNKNOWN_JOB}"),
    ("POST", f"/v1/jobs/{UNKNOWN_JOB}/results"), ("GET", "/v1/embeddings"),
    ("POST", "/healthz"), ("DELETE", "/metrics"),
])
async def test_a_wrong_method_is_a_405(client: httpx.AsyncClient, redis: Any,
                                       method: str, path: str) -> None:
    response = await client.request(method, path, json={"inputs": ["a"]})
    assert_error(response, 405, "method_not_allowed")
    await assert_nothing_queued(redis)


async def test_an_unknown_path_is_a_404_in_the_error_shape(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/v1/nothing-here"), 404, "not_found")


# No input may produce a 500


def odd_values() -> list[Any]:
    """JSON values that are legal JSON but unusual in every position."""
    return [None, True, False, 0, -1, 1.5, 10**18, -(10**18), 1e308, -0.0, "", " ", "NaN",
            "Infinity", "-1", "\x00", "\u2028", "\U0001f600" * 3, "a" * 2001, [], [[]],
            [None], ["a"], [1, "a"], {}, {"text": None}, {"text": "a", "id": None},
            {"text": {"text": "a"}}, {"inputs": ["a"]}, [[[[["deep"]]]]]]


def odd_bodies(rng: random.Random) -> list[bytes]:
    bodies = [json.dumps(v).encode() for v in odd_values()]
    fields = ["inputs", "normalize", "dimensions", "truncate", "model", "input",
              "encoding_format", "user"]
    for _ in range(60):
        body = {rng.choice(fields): rng.choice(odd_values()) for _ in range(rng.randint(1, 4))}
        if rng.random() < 0.5:
            body["inputs"] = [rng.choice(odd_values()) for _ in range(rng.randint(1, 3))]
            body["input"] = body["inputs"]
        bodies.append(json.dumps(body).encode())
    bodies += [b"[" * 5000 + b"]" * 5000, b'{"inputs": [' + b"1" * 400 + b"]}",
               b'{"inputs": ["a"], "dimensions": 1' + b"0" * 40 + b"}",
               b'{"inputs": ["a"], "dimensions": 1e400}', b'{"inputs": ["a"]}' * 2,
               b"\x00\x01\x02", b'{"inputs": ["\\u0000"]}', b"\xff" * 10]
    return bodies


async def test_no_odd_body_produces_a_server_error(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    # The worker answers the bodies that happen to be valid embeddings requests.
    rng = random.Random(20240607)
    for body in odd_bodies(rng):
        for path in ("/v1/jobs", "/v1/embeddings"):
            for headers in ({"content-type": "application/json"}, NDJSON):
                if path == "/v1/embeddings" and headers is NDJSON:
                    continue
                response = await client.post(path, content=body, headers=headers)
                assert response.status_code < 500, (path, body[:80], response.text)
                if response.status_code >= 400:
                    assert_error(response, response.status_code)


async def test_no_odd_query_or_path_produces_a_server_error(client: httpx.AsyncClient) -> None:
    job_id = await submit(client, texts(5))
    oddities = ["", "%00", "%ff", "\u00b2", "-0", "+1", "1e3", "0x10", " 1", "9" * 400,
                "null", "%0A", "[]", "NaN"]
    for odd in oddities:
        for path in (f"/v1/jobs/{job_id}/results?cursor={odd}",
                     f"/v1/jobs/{job_id}/results?limit={odd}",
                     f"/v1/jobs/{job_id}/results?encoding={odd}",
                     f"/v1/jobs/{job_id}/events?after={odd}&encoding=nope",
                     f"/v1/jobs/{odd}", f"/v1/jobs/{odd}/results"):
            response = await client.get(path)
            assert response.status_code < 500, (path, response.text)
        response = await client.post(f"/v1/jobs?dimensions={odd}&normalize={odd}",
                                     content=b'"a"\n', headers=NDJSON)
        assert response.status_code < 500, (odd, response.text)


# Happy paths


async def test_a_json_submission_is_accepted_with_links(
    client: httpx.AsyncClient, redis: Any
) -> None:
    response = await client.post("/v1/jobs", json={"inputs": texts(6)})
    assert response.status_code == 202
    body = response.json()
    job_id = body["id"]
    assert re.fullmatch(r"[0-9a-f]{32}", job_id)
    assert body == {"id": job_id, "status": "queued", "total": 6, "links": {
        "self": f"/v1/jobs/{job_id}", "events": f"/v1/jobs/{job_id}/events",
        "results": f"/v1/jobs/{job_id}/results"}}
    assert response.headers["location"] == f"/v1/jobs/{job_id}"
    assert sum([await redis.xlen(stream) for stream in QUEUES]) == 2  # two chunks of four


async def test_a_queued_jobs_status_has_every_field(client: httpx.AsyncClient) -> None:
    job_id = await submit(client, texts(3), dimensions=64)
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    assert set(job) == STATUS_FIELDS
    assert job["id"] == job_id and job["status"] == "queued"
    assert (job["total"], job["done"], job["failed"]) == (3, 0, 0)
    assert (job["model"], job["dimensions"]) == (DEFAULT_MODEL, 64)
    assert job["created_at"].endswith("Z")
    assert job["started_at"] is None and job["finished_at"] is None and job["error"] is None


async def test_a_finished_job_reports_completion(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    job_id = await submit(client, texts(9))
    job = await wait_done(client, job_id)
    assert set(job) == STATUS_FIELDS
    assert (job["status"], job["total"], job["done"], job["failed"]) == ("completed", 9, 9, 0)
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert job["dimensions"] == DIMS and job["error"] is None


async def test_an_ndjson_upload_keeps_ids_and_order_across_blank_lines(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    lines = ['"plain first"', "", '{"id": "b", "text": "object second"}', "   ",
             '{"text": "object without id", "metadata": {"k": 1}}', '"plain last"']
    response = await client.post("/v1/jobs?dimensions=16&normalize=true",
                                 content="\r\n".join(lines) + "\n", headers=NDJSON)
    assert response.status_code == 202, response.text
    assert response.json()["total"] == 4
    job_id = response.json()["id"]
    await wait_done(client, job_id)
    rows = (await client.get(f"/v1/jobs/{job_id}/results")).json()["results"]
    assert [(r["index"], r["id"]) for r in rows] == [(0, None), (1, "b"), (2, None), (3, None)]
    expected = ["plain first", "object second", "object without id", "plain last"]
    for row, text in zip(rows, expected, strict=True):
        assert row["embedding"] == pytest.approx(
            expected_vector(text, DIMS, output_dimensions=16), abs=1e-6)


async def test_results_page_by_cursor_and_limit_in_index_order(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    inputs = [{"id": f"doc-{i}", "text": t} for i, t in enumerate(texts(11))]
    job_id = await submit(client, inputs)
    await wait_done(client, job_id)
    seen, cursors, cursor = [], [], None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = (await client.get(f"/v1/jobs/{job_id}/results", params=params)).json()
        assert set(page) == {"results", "next_cursor", "backend"}
        seen += page["results"]
        cursor = page["next_cursor"]
        cursors.append(cursor)
        if cursor is None:
            break
    assert cursors == ["3", "6", "9", None]
    assert [r["index"] for r in seen] == list(range(11))
    assert [r["id"] for r in seen] == [f"doc-{i}" for i in range(11)]
    for row, text in zip(seen, texts(11), strict=True):
        assert set(row) == {"index", "id", "embedding", "truncated"}
        assert row["embedding"] == pytest.approx(expected_vector(text, DIMS), abs=1e-6)
    whole = (await client.get(f"/v1/jobs/{job_id}/results")).json()
    assert whole["next_cursor"] is None and len(whole["results"]) == 11


async def test_base64_results_decode_to_the_float_results(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    job_id = await submit(client, texts(5), dimensions=32, normalize=False)
    await wait_done(client, job_id)
    url = f"/v1/jobs/{job_id}/results"
    floats = (await client.get(url)).json()["results"]
    packed = (await client.get(url, params={"encoding": "base64"})).json()["results"]
    for as_float, as_b64 in zip(floats, packed, strict=True):
        decoded = np.frombuffer(base64.b64decode(as_b64["embedding"]), dtype="<f4")
        assert decoded.shape == (32,)
        assert decoded.tolist() == pytest.approx(as_float["embedding"], abs=1e-7)


async def test_delete_cancels_a_queued_job_and_ends_its_events(
    client: httpx.AsyncClient, redis: Any
) -> None:
    job_id = await submit(client, texts(6))
    response = await client.delete(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    job = response.json()
    assert set(job) == STATUS_FIELDS
    assert job["status"] == "cancelled" and job["finished_at"] is not None
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "cancelled"
    entries = await redis.xrange(KEYS.events(job_id))
    assert entries[-1][1] == {b"type": b"end", b"status": b"cancelled"}
    with anyio.fail_after(10):
        response = await client.get(f"/v1/jobs/{job_id}/events")
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert [e["event"] for e in events] == ["end"]
    assert events[0]["data"]["status"] == "cancelled" and events[0]["id"]
    page = (await client.get(f"/v1/jobs/{job_id}/results")).json()
    assert page == {"results": [], "next_cursor": None, "backend": None}
    again = await client.delete(f"/v1/jobs/{job_id}")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


async def test_input_instead_of_inputs_is_a_422_that_names_inputs(
    client: httpx.AsyncClient, redis: Any
) -> None:
    response = await client.post("/v1/jobs", json={"input": ["a cat"]})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "takes 'inputs'" in message and "POST /v1/embeddings" in message
    assert await redis.keys("es:{*}:job") == []


async def test_a_cancelled_jobs_results_skip_chunks_never_made_without_empty_pages(
    client: httpx.AsyncClient, redis: Any
) -> None:
    job_id = await submit(client, texts(40))  # ten chunks of four; no worker runs
    await client.delete(f"/v1/jobs/{job_id}")
    meta = {"n": 4, "dims": DIMS, "ids": None, "truncated": [], "errors": {}, "tokens": 16}
    await redis.hset(KEYS.vectors(job_id), mapping={  # as if chunk 7 had been made
        "v:7": np.ones((4, DIMS), "<f4").tobytes(), "m:7": json.dumps(meta)})
    page = (await client.get(f"/v1/jobs/{job_id}/results", params={"limit": 3})).json()
    assert [r["index"] for r in page["results"]] == [28, 29, 30]
    assert page["next_cursor"] == "31"
    rest = (await client.get(f"/v1/jobs/{job_id}/results", params={"cursor": "31"})).json()
    assert [r["index"] for r in rest["results"]] == [31]
    assert rest["next_cursor"] is None, "chunks 8 and 9 were never made: the page ends the job"


async def test_the_event_stream_of_a_finished_job_replays_it_and_resumes(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    job_id = await submit(client, texts(9))
    await wait_done(client, job_id)
    with anyio.fail_after(10):
        events = parse_sse((await client.get(f"/v1/jobs/{job_id}/events")).text)
    assert [e["event"] for e in events] == ["result", "progress"] * 3 + ["end"]
    rows = [row for e in events if e["event"] == "result" for row in e["data"]]
    assert sorted(row["index"] for row in rows) == list(range(9))
    assert events[-1]["data"]["status"] == "completed"
    with anyio.fail_after(10):
        resumed = parse_sse((await client.get(f"/v1/jobs/{job_id}/events",
                                              headers={"Last-Event-ID": events[1]["id"]})).text)
    assert resumed == events[2:]


async def test_an_idempotency_key_returns_the_same_job_on_retry(
    client: httpx.AsyncClient, redis: Any
) -> None:
    body = {"inputs": texts(3)}
    first = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    retry = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    other = await client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-2"})
    plain = await client.post("/v1/jobs", json=body)
    assert [r.status_code for r in (first, retry, other, plain)] == [202] * 4
    assert retry.json()["id"] == first.json()["id"]
    assert len({first.json()["id"], other.json()["id"], plain.json()["id"]}) == 3
    assert await redis.xlen(QUEUES[0]) == 3  # one chunk each for three distinct jobs
    ndjson_first = await client.post("/v1/jobs", content=b'"a"\n', headers={
        **NDJSON, "Idempotency-Key": "k-3"})
    ndjson_retry = await client.post("/v1/jobs", content=b'"a"\n', headers={
        **NDJSON, "Idempotency-Key": "k-3"})
    assert ndjson_first.json()["id"] == ndjson_retry.json()["id"]


async def test_an_idempotency_key_sent_with_another_body_is_a_422(
    client: httpx.AsyncClient, redis: Any
) -> None:
    headers = {"Idempotency-Key": "k-reused"}
    first = await client.post("/v1/jobs", json={"inputs": texts(3)}, headers=headers)
    other = await client.post("/v1/jobs", json={"inputs": texts(4)}, headers=headers)
    options = await client.post("/v1/jobs", json={"inputs": texts(3), "dimensions": 8},
                                headers=headers)
    streamed = await client.post("/v1/jobs", content=b'"a"\n', headers={**NDJSON, **headers})
    for response in (other, options, streamed):
        assert_error(response, 422, "idempotency_key_reused", "another request")
        assert first.json()["id"] in response.json()["error"]["message"]
    assert await redis.xlen(QUEUES[0]) == 1, "only the first request was queued"


# The OpenAI-compatible endpoint


async def test_embeddings_answer_in_the_openai_shape(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    inputs = ["hello world", "a second and longer text"]
    response = await client.post("/v1/embeddings", json={"input": inputs,
                                                         "model": DEFAULT_MODEL})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["model"] == DEFAULT_MODEL
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0),
                                                                 ("embedding", 1)]
    for item, text in zip(body["data"], inputs, strict=True):
        assert item["embedding"] == pytest.approx(expected_vector(text, DIMS), abs=1e-6)
    tokens = sum(token_count(t) for t in inputs)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert tokens > 0


async def test_embeddings_accept_one_string_and_base64_and_dimensions(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    response = await client.post("/v1/embeddings", json={
        "input": "just one", "encoding_format": "base64", "dimensions": 8, "user": "me"})
    assert response.status_code == 200, response.text
    [item] = response.json()["data"]
    decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
    assert decoded.tolist() == pytest.approx(
        expected_vector("just one", DIMS, output_dimensions=8), abs=1e-6)
    assert response.json()["usage"]["prompt_tokens"] == token_count("just one")


@pytest.mark.parametrize("body,status,words", [
    ({}, 422, ["'input'"]),
    ({"input": []}, 422, ["'input'"]),
    ({"input": None}, 422, ["'input'"]),
    ({"input": ""}, 422, ["inputs[0]", "empty"]),
    ({"input": ["a", "  "]}, 422, ["inputs[1]"]),
    ({"input": [1, 2, 3]}, 422, ["token arrays"]),
    ({"input": [[1, 2]]}, 422, ["token arrays"]),
    ({"input": ["a"], "encoding_format": "hex"}, 422, ["'encoding_format'"]),
    ({"input": ["a"], "dimensions": 0}, 422, ["'dimensions'"]),
    ({"input": ["a"], "dimensions": 999}, 422, ["'dimensions'"]),
    ({"input": ["a"], "model": "gpt-4"}, 422, ["gpt-4"]),
    ({"input": ["a"], "temperature": 1}, 422, ["temperature"]),
    ({"input": ["x"] * 2049}, 413, ["2048"]),
])
async def test_bad_embeddings_requests_are_4xx(
    client: httpx.AsyncClient, redis: Any, body: dict[str, Any], status: int, words: list[str]
) -> None:
    assert_error(await client.post("/v1/embeddings", json=body), status, None, *words)
    await assert_nothing_queued(redis)


async def test_embeddings_refuse_a_non_json_body(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/embeddings", content=b'"a"\n', headers=NDJSON)
    assert_error(response, 415, "unsupported_media_type", "Content-Type")
    response = await client.post("/v1/embeddings", content=b'{"input": "caf\xe9"}',
                                 headers={"content-type": "application/json"})
    assert_error(response, 400, None, "malformed JSON")


# Probes and metrics


async def test_healthz_answers_without_any_worker(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_readyz_is_503_without_a_worker(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "no_workers", "redis": True, "workers": 0}


async def test_readyz_is_200_with_a_live_worker(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready", "redis": True, "workers": 1}


async def test_readyz_is_503_when_redis_is_unreachable(api_settings: Settings) -> None:
    unreachable = api_settings.replace(redis_url="redis://127.0.0.1:1/0")
    async with serving(unreachable) as http:
        response = await http.get("/readyz")
    assert response.status_code == 503
    assert response.json()["redis"] is False


async def test_metrics_expose_the_pipeline_gauges(
    client: httpx.AsyncClient, worker: Worker
) -> None:
    job_id = await submit(client, texts(5))
    await wait_done(client, job_id)
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = {line.split()[0]: float(line.split()[1]) for line in response.text.splitlines()
              if line.startswith("embedstream_")}
    assert values["embedstream_workers"] == 1
    assert values["embedstream_texts_embedded_total"] == 5
    assert values["embedstream_queued_chunks"] == 0
    assert "embedstream_running_chunks" in values
    assert "embedstream_texts_per_second" in values


# API keys


@pytest.fixture
async def keyed(api_settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    async with serving(api_settings.replace(api_keys=("k1", "k2"))) as http:
        yield http


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic azE6"}, {"X-API-Key": "k3"},
                                     {"Authorization": "Bearer "}, {"Authorization": "k1"}])
@pytest.mark.parametrize("method,path", [("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{UNKNOWN_JOB}"),
                                         ("GET", "/v1/events"), ("POST", "/v1/embeddings"),
                                         ("GET", "/metrics"), ("GET", "/v1/jobs")])
async def test_without_the_right_key_requests_are_401(
    keyed: httpx.AsyncClient, redis: Any, method: str, path: str, headers: dict[str, str]
) -> None:
    response = await keyed.request(method, path, json={"inputs": ["a"]}, headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    await assert_nothing_queued(redis)


async def test_probes_stay_open_with_api_keys(keyed: httpx.AsyncClient) -> None:
    assert (await keyed.get("/healthz")).status_code == 200
    assert (await keyed.get("/readyz")).status_code == 503  # no worker, but not a 401


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer k1"},
                                     {"Authorization": "bearer k2"}, {"X-API-Key": "k1"}])
async def test_the_right_key_gets_through(keyed: httpx.AsyncClient,
                                          headers: dict[str, str]) -> None:
    response = await keyed.post("/v1/jobs", json={"inputs": ["a"]}, headers=headers)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert (await keyed.get(f"/v1/jobs/{job_id}", headers=headers)).status_code == 200


async def test_idempotency_keys_are_scoped_to_the_api_key(keyed: httpx.AsyncClient) -> None:
    body = {"inputs": ["a"]}
    one = await keyed.post("/v1/jobs", json=body, headers={"Authorization": "Bearer k1",
                                                           "Idempotency-Key": "same"})
    two = await keyed.post("/v1/jobs", json=body, headers={"Authorization": "Bearer k2",
                                                           "Idempotency-Key": "same"})
    assert one.json()["id"] != two.json()["id"]
