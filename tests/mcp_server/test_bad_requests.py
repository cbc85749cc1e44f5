"""Generated bad requests to the JSON and NDJSON job APIs: never a 5xx, never a job.

Hypothesis builds request bodies that each break one rule (a wrong type, an
unknown field, an empty or whitespace text, a bad option, a bad line); the
in-process app must answer each with a 4xx in the one error shape, and no
job record, inputs or queue entry may appear. The number of examples is
bounded so the test stays within a few seconds.
"""

from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcp_server.app import create_app
from pipeline.keys import Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.settings import Settings
from pipeline.store.connections import connect

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
EXAMPLES = 40
NDJSON = {"content-type": "application/x-ndjson"}

ints = st.integers(-2**31, 2**31)  # orjson writes 64-bit integers only
json_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=6)
blank = st.sampled_from(["", " ", "\t\n", "\u00a0"])
bad_items = st.one_of(
    blank,
    st.none(), ints, st.booleans(), st.lists(st.text(max_size=3), max_size=2),
    st.fixed_dictionaries({"text": blank}),
    st.fixed_dictionaries({"id": st.text(max_size=3)}),
    st.fixed_dictionaries({"text": st.just("ok"), "nope": json_values}),
    st.fixed_dictionaries({"text": st.just("ok"), "metadata": ints | st.text()}),
    st.fixed_dictionaries({"text": st.just("ok"), "id": ints | st.text(min_size=257)}),
)
bad_options = st.one_of(
    st.fixed_dictionaries({"dimensions": st.sampled_from([0, -3, "8", 1.5, True, 10**6])}),
    st.fixed_dictionaries({"normalize": st.sampled_from(["yes", 1, None, [], {}])}).filter(
        lambda o: o["normalize"] is not None),
    st.fixed_dictionaries({"timeout_s": st.sampled_from([0, -1, "10", True, 10**9])}),
    st.fixed_dictionaries({"model": st.sampled_from(["", " ", 5, "no-such-model"])}),
    st.dictionaries(st.sampled_from(["colour", "inputz", "batch"]), json_values, min_size=1),
)


@st.composite
def bad_json_bodies(draw: st.DrawFn) -> Any:
    good = [draw(st.text(min_size=1, max_size=10).filter(str.strip))]
    kind = draw(st.sampled_from(["item", "option", "inputs", "shape"]))
    if kind == "item":
        items = [*good, draw(bad_items)]
        return {"inputs": draw(st.permutations(items))}
    if kind == "option":
        return {"inputs": good, **draw(bad_options)}
    if kind == "inputs":
        return {"inputs": draw(st.sampled_from([[], None, "text", 5, {"text": "x"}]))}
    return draw(st.one_of(st.lists(json_values, max_size=3), st.text(max_size=5),
                          ints, st.none()))


@st.composite
def bad_ndjson_uploads(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    lines = [orjson.dumps(draw(st.text(min_size=1, max_size=10).filter(str.strip)))]
    kind = draw(st.sampled_from(["item", "line", "query"]))
    query: dict[str, str] = {}
    if kind == "item":
        lines.insert(draw(st.integers(0, 1)), orjson.dumps(draw(bad_items)))
    elif kind == "line":
        lines.append(draw(st.sampled_from([b"{", b"[1,", b"'single'", b"nul", b"\xff\xfe"])))
    else:
        bad_values = {"dimensions": ["x", "-1", "0", "1.5"], "normalize": ["x", "maybe"],
                      "timeout_s": ["x", "-1", "0", "1e999", "nan"], "colour": ["red", ""]}
        name = draw(st.sampled_from(sorted(bad_values)))
        query[name] = draw(st.sampled_from(bad_values[name]))
    return b"\n".join(lines), query


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.replace(max_text_chars=200), with_mcp=False)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport,
                                     base_url="http://127.0.0.1") as http:
            yield http


async def nothing_created(settings: Settings) -> None:
    assert settings.redis_url
    redis = connect(settings.redis_url)
    try:
        jobs = [k async for k in redis.scan_iter(match="es:{*", count=1000)]
        assert jobs == []
        for stream in KEYS.queues(DEFAULT_MODEL):
            assert await redis.xlen(stream) == 0
    finally:
        await redis.aclose()


def assert_client_error(reply: httpx.Response) -> None:
    assert 400 <= reply.status_code < 500, (reply.status_code, reply.text)
    error = reply.json()["error"]
    assert error["code"] and error["message"]


LIMITS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])


async def test_generated_bad_json_bodies_get_a_4xx_and_create_no_job(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    bodies: list[Any] = []

    @LIMITS
    @given(bad_json_bodies())
    def collect(body: Any) -> None:
        bodies.append(body)

    collect()
    for body in bodies:
        reply = await client.post("/v1/jobs", content=orjson.dumps(body),
                                  headers={"content-type": "application/json"})
        assert 400 <= reply.status_code < 500, (body, reply.text)
        assert_client_error(reply)
    await nothing_created(settings)


async def test_generated_bad_ndjson_uploads_get_a_4xx_and_create_no_job(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    uploads: list[tuple[bytes, dict[str, str]]] = []

    @LIMITS
    @given(bad_ndjson_uploads())
    def collect(upload: tuple[bytes, dict[str, str]]) -> None:
        uploads.append(upload)

    collect()
    for body, query in uploads:
        reply = await client.post("/v1/jobs", content=body, params=query, headers=NDJSON)
        assert 400 <= reply.status_code < 500, (body, query, reply.text)
        assert_client_error(reply)
    await nothing_created(settings)
