"""The idempotent chunk commit, reading results back by page, and following a job's events.

Every test runs against Valkey and against Redis 7.0: the commit is a Lua
script and the event ids are stream ids, both of which the servers must
agree on.
"""

import base64
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

import anyio
import numpy as np
import pytest

from pipeline.errors import InvalidCursor, InvalidJobId, JobNotFound
from pipeline.inputs import Item, JobOptions
from pipeline.jobs import results
from pipeline.jobs.events import ChunkRows, Event, check_event_id, follow_job_live
from pipeline.jobs.quantize import VectorView
from pipeline.jobs.record import JobStatus, load_job
from pipeline.jobs.results import ChunkResult, parse_cursor
from pipeline.jobs.scripts import CommitOutcome, Committed, JobScripts
from pipeline.jobs.scripts import cancel_job as cancel_with_scripts
from pipeline.jobs.submission import JobWriter
from pipeline.keys import Keys
from pipeline.model.info import ModelInfo
from pipeline.settings import Settings
from pipeline.store.connections import connect
from pipeline.store.fanout import Hubs

pytestmark = pytest.mark.anyio

DIMS = 4
CHUNK = 3
TTL_S = 3600
INFO = ModelInfo("fake-model", DIMS, 16)
KEYS = Keys("es")


@pytest.fixture
async def client(any_redis_url: str) -> AsyncIterator[Any]:
    redis = connect(any_redis_url)
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture
async def blocking(any_redis_url: str) -> AsyncIterator[Any]:
    redis = connect(any_redis_url, blocking=True)
    try:
        yield redis
    finally:
        await redis.aclose()


async def make_job(client: Any, total: int) -> str:
    """A queued job of `total` inputs in chunks of CHUNK, ids "id-<index>"."""
    settings = Settings(redis_url="unused", chunk_size=CHUNK)
    writer = JobWriter(client, KEYS, settings, JobOptions(), INFO)
    await writer.add_many(Item(f"text {i}", f"id-{i}") for i in range(total))
    record = await writer.commit()
    return record.id


async def cancel_job(client: Any, keys: Keys, settings: Settings, job_id: str) -> dict[str, Any]:
    return dict((await cancel_with_scripts(JobScripts(client, keys), settings, job_id)).public())


async def get_job(client: Any, keys: Keys, job_id: str) -> dict[str, Any]:
    """The job as the API shows it."""
    return dict((await load_job(client, keys, job_id)).public())


async def read_page(client: Any, keys: Keys, job_id: str, *args: Any, **kwargs: Any
                    ) -> dict[str, Any]:
    """One page of results, shaped as the API shows it."""
    page = await results.read_page(client, keys, job_id, *args, **kwargs)
    return {"results": page.rows, "next_cursor": page.next_cursor, "backend": page.backend}


async def follow_job(client: Any, blocking: Any, keys: Keys, job_id: str, *,
                     after: str | None = None, encoding: str = "float", block_ms: int = 50
                     ) -> AsyncIterator[Event]:
    """The job's events through a fan-out hub of its own, as a server follows them."""
    hubs = Hubs(client, blocking, block_ms=block_ms, buffer=1000)
    try:
        stream = follow_job_live(client, hubs, keys, ChunkRows(client, keys), job_id,
                                 after=after, view=VectorView(encoding))
        async with aclosing(stream):
            async for event in stream:
                yield event
    finally:
        await hubs.close()


def vectors_for(chunk: int, n: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Distinct, exactly representable values: row i of chunk c starts at 1000*index."""
    first = chunk * CHUNK
    return np.array([[1000.0 * (first + i) + d + 0.25 for d in range(DIMS)] for i in range(n)],
                    dtype=np.float32)


def chunk_result(job_id: str, chunk: int, n: int = CHUNK, *,
                 errors: dict[int, str] | None = None,
                 truncated: list[int] | None = None) -> ChunkResult:
    ids: list[str | None] = [f"id-{chunk * CHUNK + i}" for i in range(n)]
    return ChunkResult(job_id, chunk, vectors_for(chunk, n), ids, truncated or [],
                       errors or {}, tokens=5 * n)


async def commit(client: Any, result: ChunkResult) -> Committed:
    async with client.pipeline(transaction=False) as pipe:
        await JobScripts(client, KEYS).queue_commit(pipe, result, TTL_S)
        [reply] = await pipe.execute()
    return JobScripts.parse_committed(reply)


async def events_of(client: Any, job_id: str) -> list[tuple[str, dict[bytes, bytes]]]:
    return [(i.decode(), f) for i, f in await client.xrange(KEYS.events(job_id))]


async def types_of(client: Any, job_id: str) -> list[bytes]:
    return [fields[b"type"] for _, fields in await events_of(client, job_id)]


async def commit_all(client: Any, job_id: str, total: int) -> None:
    for chunk in range(-(-total // CHUNK)):
        await commit(client, chunk_result(job_id, chunk, min(CHUNK, total - chunk * CHUNK)))


# The commit


async def test_committing_the_same_chunk_twice_writes_it_once(client: Any) -> None:
    job_id = await make_job(client, 6)
    first = await commit(client, chunk_result(job_id, 0))
    again = await commit(client, replace(chunk_result(job_id, 0), vectors=vectors_for(1, 3)))
    assert first == Committed(CommitOutcome.WRITTEN, done=3, failed=0, total=6,
                              status=JobStatus.RUNNING)
    assert again.outcome is CommitOutcome.DUPLICATE and not again.written and not again.finished
    job = await get_job(client, KEYS, job_id)
    assert (job["done"], job["failed"], job["status"]) == (3, 0, "running")
    assert await types_of(client, job_id) == [b"result"]
    page = await read_page(client, KEYS, job_id, limit=3)
    assert np.array_equal(np.array([r["embedding"] for r in page["results"]]),
                          vectors_for(0, 3))
    assert int(await client.hget(KEYS.job(job_id), "tokens")) == 15


async def test_a_job_finishes_exactly_when_its_last_chunk_is_committed(client: Any) -> None:
    job_id = await make_job(client, 7)  # chunks of 3, 3 and 1
    assert (await get_job(client, KEYS, job_id))["status"] == "queued"
    for chunk, n in ((2, 1), (0, 3)):
        outcome = await commit(client, chunk_result(job_id, chunk, n))
        assert outcome.written and not outcome.finished
        job = await get_job(client, KEYS, job_id)
        assert job["status"] == "running" and job["finished_at"] is None
        assert job["started_at"] is not None
        # A running job's keys live as long as it may wait, then its results do.
        live_s = Settings().job_timeout_s + TTL_S
        for key in KEYS.job_keys(job_id):
            assert TTL_S < await client.ttl(key) <= live_s
    assert b"end" not in await types_of(client, job_id)

    last = await commit(client, chunk_result(job_id, 1))
    assert last == Committed(CommitOutcome.LAST, done=7, failed=0, total=7,
                             status=JobStatus.COMPLETED)
    job = await get_job(client, KEYS, job_id)
    assert (job["status"], job["done"], job["failed"]) == ("completed", 7, 0)
    assert job["finished_at"] is not None and job["error"] is None
    events = await events_of(client, job_id)
    assert [f[b"type"] for _, f in events] == [b"result"] * 3 + [b"end"]
    assert events[-1][1][b"status"] == b"completed"
    assert [int(f[b"done"]) for _, f in events[:3]] == [1, 4, 7]
    for key in KEYS.job_keys(job_id):
        assert 0 < await client.ttl(key) <= TTL_S


async def test_the_job_records_the_backends_that_embedded_it(client: Any) -> None:
    job_id = await make_job(client, 4 * CHUNK)
    assert (await get_job(client, KEYS, job_id))["backend"] is None
    await commit(client, replace(chunk_result(job_id, 0), backend="onnx"))
    await commit(client, replace(chunk_result(job_id, 1), backend="onnx"))
    assert (await get_job(client, KEYS, job_id))["backend"] == "onnx"
    page = await read_page(client, KEYS, job_id, limit=1)
    assert page["backend"] == "onnx"
    await commit(client, replace(chunk_result(job_id, 2), backend="onnx-int8"))
    await commit(client, chunk_result(job_id, 3))  # given up on: no backend
    job = await get_job(client, KEYS, job_id)
    assert job["status"] == "completed" and job["backend"] == "onnx,onnx-int8"


async def test_a_finished_job_ignores_a_late_redelivered_chunk(client: Any) -> None:
    job_id = await make_job(client, 3)
    assert (await commit(client, chunk_result(job_id, 0))).finished
    assert (await commit(client, chunk_result(job_id, 0))).outcome is CommitOutcome.DUPLICATE
    assert await types_of(client, job_id) == [b"result", b"end"]


async def test_failed_inputs_count_as_failed_and_keep_their_reason(client: Any) -> None:
    job_id = await make_job(client, 3)
    outcome = await commit(client, chunk_result(job_id, 0, errors={1: "the model choked"}))
    assert outcome == Committed(CommitOutcome.LAST, done=2, failed=1, total=3,
                                status=JobStatus.COMPLETED)
    rows = (await read_page(client, KEYS, job_id))["results"]
    assert [r["embedding"] is None for r in rows] == [False, True, False]
    assert rows[1]["error"] == "the model choked"
    assert "error" not in rows[0]


async def test_a_job_whose_every_input_failed_ends_failed(client: Any) -> None:
    job_id = await make_job(client, 2)
    outcome = await commit(client, chunk_result(job_id, 0, 2, errors={0: "bad", 1: "bad"}))
    assert (outcome.status, outcome.failed, outcome.done) == ("failed", 2, 0)
    job = await get_job(client, KEYS, job_id)
    assert job["status"] == "failed" and "every input failed" in job["error"]
    events = await events_of(client, job_id)
    assert events[-1][1] == {b"type": b"end", b"status": b"failed"}


async def test_a_chunk_committed_after_cancel_is_dropped(client: Any) -> None:
    job_id = await make_job(client, 6)
    await commit(client, chunk_result(job_id, 0))
    cancelled = await cancel_job(client, KEYS, Settings(result_ttl_s=TTL_S), job_id)
    assert cancelled["status"] == "cancelled"
    outcome = await commit(client, chunk_result(job_id, 1))
    assert outcome.outcome is CommitOutcome.JOB_ENDED and not outcome.written
    job = await get_job(client, KEYS, job_id)
    assert (job["status"], job["done"]) == ("cancelled", 3)
    assert await types_of(client, job_id) == [b"result", b"end"]
    assert not await client.hexists(KEYS.vectors(job_id), "m:1")
    for key in KEYS.job_keys(job_id):
        assert 0 < await client.ttl(key) <= TTL_S


async def test_cancelling_a_finished_job_leaves_it_as_it_is(client: Any) -> None:
    job_id = await make_job(client, 3)
    await commit(client, chunk_result(job_id, 0))
    job = await cancel_job(client, KEYS, Settings(), job_id)
    assert job["status"] == "completed"
    assert await types_of(client, job_id) == [b"result", b"end"]


async def test_a_commit_for_an_expired_job_writes_nothing(client: Any) -> None:
    job_id = "e" * 32
    assert (await commit(client, chunk_result(job_id, 0))).outcome is CommitOutcome.JOB_GONE
    assert await client.exists(*KEYS.job_keys(job_id)) == 0


async def test_marking_started_moves_only_a_queued_job_to_running(client: Any) -> None:
    job_id = await make_job(client, 3)
    for _ in range(2):
        async with client.pipeline(transaction=False) as pipe:
            await JobScripts(client, KEYS).queue_mark_started(pipe, job_id)
            await pipe.execute()
        job = await get_job(client, KEYS, job_id)
        assert job["status"] == "running" and job["started_at"] is not None
    other = await make_job(client, 3)
    await cancel_job(client, KEYS, Settings(), other)
    async with client.pipeline(transaction=False) as pipe:
        await JobScripts(client, KEYS).queue_mark_started(pipe, other)
        await pipe.execute()
    assert (await get_job(client, KEYS, other))["status"] == "cancelled"


# Reading pages


async def test_pages_follow_index_order_with_cursors(client: Any) -> None:
    job_id = await make_job(client, 10)
    for chunk in (3, 1, 0, 2):  # committed out of order
        await commit(client, chunk_result(job_id, chunk, 1 if chunk == 3 else CHUNK))
    seen: list[dict[str, Any]] = []
    cursors: list[str | None] = []
    cursor: str | None = None
    while True:
        page = await read_page(client, KEYS, job_id, cursor, limit=4)
        assert len(page["results"]) <= 4
        seen.extend(page["results"])
        cursor = page["next_cursor"]
        cursors.append(cursor)
        if cursor is None:
            break
    assert cursors == ["4", "8", None]
    assert [r["index"] for r in seen] == list(range(10))
    assert [r["id"] for r in seen] == [f"id-{i}" for i in range(10)]
    for row in seen:
        assert row["embedding"][0] == pytest.approx(1000.0 * row["index"] + 0.25)
        assert row["truncated"] is False


async def test_a_page_can_start_inside_a_chunk(client: Any) -> None:
    job_id = await make_job(client, 9)
    await commit_all(client, job_id, 9)
    page = await read_page(client, KEYS, job_id, "4", limit=3)
    assert [r["index"] for r in page["results"]] == [4, 5, 6]
    assert page["next_cursor"] == "7"
    page = await read_page(client, KEYS, job_id, "7", limit=100)
    assert [r["index"] for r in page["results"]] == [7, 8]
    assert page["next_cursor"] is None
    assert await read_page(client, KEYS, job_id, "9") == {"results": [], "next_cursor": None,
                                                           "backend": None}


async def test_a_running_jobs_page_stops_at_the_first_chunk_not_made(client: Any) -> None:
    job_id = await make_job(client, 9)
    await commit(client, chunk_result(job_id, 0))
    await commit(client, chunk_result(job_id, 2))  # chunk 1 is still missing
    page = await read_page(client, KEYS, job_id, limit=100)
    assert [r["index"] for r in page["results"]] == [0, 1, 2]
    assert page["next_cursor"] == "3"
    again = await read_page(client, KEYS, job_id, page["next_cursor"], limit=100)
    assert again == {"results": [], "next_cursor": "3", "backend": None}
    await commit(client, chunk_result(job_id, 1))
    rest = await read_page(client, KEYS, job_id, "3", limit=100)
    assert [r["index"] for r in rest["results"]] == [3, 4, 5, 6, 7, 8]
    assert rest["next_cursor"] is None


async def test_a_cancelled_jobs_pages_skip_chunks_never_made(client: Any) -> None:
    job_id = await make_job(client, 9)
    await commit(client, chunk_result(job_id, 0))
    await commit(client, chunk_result(job_id, 2))
    await cancel_job(client, KEYS, Settings(), job_id)
    page = await read_page(client, KEYS, job_id, limit=100)
    assert [r["index"] for r in page["results"]] == [0, 1, 2, 6, 7, 8]
    assert page["next_cursor"] is None
    # The page reads on past the chunks never made instead of stopping short.
    small = await read_page(client, KEYS, job_id, "2", limit=2)
    assert [r["index"] for r in small["results"]] == [2, 6]
    assert small["next_cursor"] == "7"


async def test_base64_rows_decode_to_the_float_rows(client: Any) -> None:
    job_id = await make_job(client, 5)
    await commit(client, chunk_result(job_id, 0, truncated=[2]))
    await commit(client, chunk_result(job_id, 1, 2))
    floats = (await read_page(client, KEYS, job_id, encoding="float"))["results"]
    packed = (await read_page(client, KEYS, job_id, encoding="base64"))["results"]
    assert [r["truncated"] for r in packed] == [False, False, True, False, False]
    for as_float, as_text in zip(floats, packed, strict=True):
        decoded = np.frombuffer(base64.b64decode(as_text["embedding"]), dtype="<f4")
        assert decoded.shape == (DIMS,)
        assert np.array_equal(decoded, np.asarray(as_float["embedding"], dtype=np.float32))
        assert {k: v for k, v in as_text.items() if k != "embedding"} == {
            k: v for k, v in as_float.items() if k != "embedding"}


async def test_rows_without_caller_ids_have_null_ids(client: Any) -> None:
    job_id = await make_job(client, 2)
    result = replace(chunk_result(job_id, 0, 2), ids=[None, None])
    await commit(client, result)
    rows = (await read_page(client, KEYS, job_id))["results"]
    assert [r["id"] for r in rows] == [None, None]


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", " 1", "0x1", "11", "99999999999",
                                    "1" * 5000, "\u00b2", "\u0661", "3\n"])
async def test_a_malformed_cursor_is_rejected(client: Any, cursor: str) -> None:
    job_id = await make_job(client, 10)
    with pytest.raises(InvalidCursor):
        await read_page(client, KEYS, job_id, cursor)


def test_an_empty_cursor_means_the_start() -> None:
    assert parse_cursor(None, 5) == 0
    assert parse_cursor("", 5) == 0
    assert parse_cursor("5", 5) == 5


@pytest.mark.parametrize("job_id", ["", "abc", "A" * 32, "g" * 32, "a" * 33, "a" * 31,
                                    "../" + "a" * 29, "a" * 32 + "\n", "{" + "a" * 31])
async def test_a_malformed_job_id_is_rejected_before_any_read(client: Any, job_id: str) -> None:
    with pytest.raises(InvalidJobId):
        await read_page(client, KEYS, job_id)
    with pytest.raises(InvalidJobId):
        await get_job(client, KEYS, job_id)
    with pytest.raises(InvalidJobId):
        await cancel_job(client, KEYS, Settings(), job_id)


async def test_a_well_formed_but_unknown_job_is_not_found(client: Any) -> None:
    with pytest.raises(JobNotFound):
        await read_page(client, KEYS, "a" * 32)
    with pytest.raises(JobNotFound):
        await cancel_job(client, KEYS, Settings(), "a" * 32)


# Following events


async def collect(client: Any, blocking: Any, job_id: str, after: str | None = None,
                  encoding: str = "float") -> list[Event]:
    events: list[Event] = []
    with anyio.fail_after(10):
        async for event in follow_job(client, blocking, KEYS, job_id, after=after,
                                      encoding=encoding, block_ms=50):
            events.append(event)
    return events


def summary(events: list[Event]) -> list[tuple[str, str, Any]]:
    """Events as comparable tuples (vectors reduced to their indexes)."""
    out: list[tuple[str, str, Any]] = []
    for event in events:
        if event.name == "result":
            out.append((event.id, "result", [row["index"] for row in event.data]))
        elif event.name == "end":
            out.append((event.id, "end", event.data["status"]))
        else:
            out.append((event.id, event.name, event.data))
    return out


async def test_following_a_finished_job_replays_results_progress_and_end(
    client: Any, blocking: Any
) -> None:
    job_id = await make_job(client, 7)
    await commit_all(client, job_id, 7)
    events = await collect(client, blocking, job_id)
    assert [e.name for e in events] == ["result", "progress"] * 3 + ["end"]
    assert summary(events)[0][2] == [0, 1, 2]
    assert events[1].data == {"done": 3, "failed": 0, "total": 7}
    assert events[-1].data["status"] == "completed" and events[-1].data["done"] == 7
    assert len({e.id for e in events}) == 4  # result and progress share their entry's id
    rows = [row for e in events if e.name == "result" for row in e.data]
    assert [r["id"] for r in rows] == [f"id-{i}" for i in range(7)]


async def test_resuming_after_any_event_id_has_no_gap_and_no_duplicate(
    client: Any, blocking: Any
) -> None:
    job_id = await make_job(client, 9)
    await commit_all(client, job_id, 9)
    full = summary(await collect(client, blocking, job_id))
    for position, (event_id, _, _) in enumerate(full[:-1]):
        last = max(i for i, (eid, _, _) in enumerate(full) if eid == event_id)
        resumed = summary(await collect(client, blocking, job_id, after=event_id))
        assert resumed == full[last + 1:], f"after event {position} ({event_id})"


async def test_resuming_after_the_end_gives_only_the_end(client: Any, blocking: Any) -> None:
    job_id = await make_job(client, 3)
    await commit_all(client, job_id, 3)
    full = await collect(client, blocking, job_id)
    resumed = await collect(client, blocking, job_id, after=full[-1].id)
    assert [(e.name, e.data["status"]) for e in resumed] == [("end", "completed")]


async def test_a_follower_sees_results_as_they_are_committed(client: Any, blocking: Any) -> None:
    job_id = await make_job(client, 9)
    received: list[Event] = []
    first_seen = anyio.Event()

    async def follow() -> None:
        async for event in follow_job(client, blocking, KEYS, job_id, block_ms=50):
            received.append(event)
            first_seen.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            await commit(client, chunk_result(job_id, 1))
            await first_seen.wait()
            await commit(client, chunk_result(job_id, 0))
            await commit(client, chunk_result(job_id, 2))
    results = [[row["index"] for row in e.data] for e in received if e.name == "result"]
    assert results == [[3, 4, 5], [0, 1, 2], [6, 7, 8]]
    assert received[-1].name == "end" and received[-1].data["status"] == "completed"


async def test_follow_in_base64_sends_packed_vectors(client: Any, blocking: Any) -> None:
    job_id = await make_job(client, 3)
    await commit_all(client, job_id, 3)
    events = await collect(client, blocking, job_id, encoding="base64")
    row = events[0].data[1]
    decoded = np.frombuffer(base64.b64decode(row["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, vectors_for(0, 3)[1])


async def test_a_cancelled_job_ends_its_event_stream(client: Any, blocking: Any) -> None:
    job_id = await make_job(client, 6)
    await commit(client, chunk_result(job_id, 0))
    await cancel_job(client, KEYS, Settings(), job_id)
    events = await collect(client, blocking, job_id)
    assert [e.name for e in events] == ["result", "progress", "end"]
    assert events[-1].data["status"] == "cancelled"


@pytest.mark.parametrize("event_id", ["abc", "1-", "-1", "1-2-3", "1.5", "1-0\n", "\u0661-0",
                                      "\u00b2", "99999999999999999999-0", "1-99999999999999999999",
                                      "1" * 21, "$", ">", "+", "0-0 ", "1\x000"])
async def test_a_malformed_event_id_is_rejected(
    client: Any, blocking: Any, event_id: str
) -> None:
    with pytest.raises(InvalidCursor):
        check_event_id(event_id)
    job_id = await make_job(client, 3)
    with pytest.raises(InvalidCursor):
        await collect(client, blocking, job_id, after=event_id)


@pytest.mark.parametrize("event_id", ["0", "0-0", "1712345678901", "1712345678901-7",
                                      "18446744073709551615-18446744073709551615"])
def test_well_formed_event_ids_are_accepted(event_id: str) -> None:
    assert check_event_id(event_id) == event_id


def test_no_event_id_means_the_start() -> None:
    assert check_event_id(None) == "0"
    assert check_event_id("") == "0"


async def test_following_a_malformed_job_id_raises_invalid_job_id(
    client: Any, blocking: Any
) -> None:
    with pytest.raises(InvalidJobId):
        await collect(client, blocking, "not-a-job")
