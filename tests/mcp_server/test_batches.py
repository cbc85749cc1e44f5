"""The OpenAI Files and Batch APIs, driven by the official `openai` client.

A live server on a loopback socket (`tests.support.live_server`) and an
in-process worker with a hash embedder; the restart and memory checks run
real `embedstream serve` processes. Nothing sleeps to wait: batches are
polled with a deadline.
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import openai
import orjson
import pytest
from openai import AsyncOpenAI
from openai.types import Batch

from pipeline.jobs import files as files_module
from pipeline.model.info import DEFAULT_MODEL
from pipeline.settings import Settings
from tests.support.fakes import POISON, GateEmbedder, HashEmbedder, PoisonEmbedder
from tests.support.live_server import live_server
from tests.support.processes import start_server
from tests.support.workers import running

pytestmark = pytest.mark.anyio

ALICE, BOB = "alice-key-0123456789", "bob-key-0123456789"
FINISHED = ("completed", "failed", "expired", "cancelled")


@pytest.fixture
def batch_settings(settings: Settings) -> Settings:
    return settings.replace(api_keys=(ALICE, BOB), block_ms=100, chunk_size=4,
                            fast_lane_max_texts=4, heartbeat_interval_s=0.2)


@pytest.fixture
def base_url(batch_settings: Settings) -> Iterator[str]:
    with live_server(batch_settings, with_mcp=False) as base:
        yield base


def client_for(base: str, key: str = ALICE) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[AsyncOpenAI]:
    async with client_for(base_url) as alice:
        yield alice


def request_line(custom_id: str, text: str | list[str], **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": DEFAULT_MODEL, "input": text, **body}}


def jsonl(lines: list[Any]) -> bytes:
    return b"".join((x if isinstance(x, bytes) else orjson.dumps(x)) + b"\n" for x in lines)


async def upload(client: AsyncOpenAI, lines: list[Any], name: str = "in.jsonl") -> str:
    stored = await client.files.create(file=(name, io.BytesIO(jsonl(lines))), purpose="batch")
    assert stored.purpose == "batch" and stored.bytes == len(jsonl(lines))
    return stored.id


async def create(client: AsyncOpenAI, file_id: str, **extra: Any) -> Batch:
    return await client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings",
                                       completion_window="24h", **extra)


async def finished(client: AsyncOpenAI, batch_id: str, timeout_s: float = 30) -> Batch:
    with anyio.fail_after(timeout_s):
        while (batch := await client.batches.retrieve(batch_id)).status not in FINISHED:
            await anyio.sleep(0.05)
    return batch


async def output_lines(client: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await client.files.content(file_id)
    return [orjson.loads(line) for line in content.content.splitlines()]


def cosine(a: list[float], b: list[float]) -> float:
    x, y = np.asarray(a), np.asarray(b)
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


async def test_a_batch_runs_through_the_openai_client_and_matches_v1_embeddings(
    batch_settings: Settings, client: AsyncOpenAI
) -> None:
    texts = {f"req-{i}": f"batch text number {i}" for i in range(9)}
    texts["req-list"] = ["first of a list", "second of a list", "third of a list"]  # type: ignore
    file_id = await upload(client, [request_line(k, v) for k, v in texts.items()])
    async with running(batch_settings, HashEmbedder(batch_settings)):
        batch = await create(client, file_id, metadata={"purpose": "nightly"})
        # A worker is running: the batch may already be done by the time create answers.
        assert batch.status in ("in_progress", "completed")
        assert batch.metadata == {"purpose": "nightly"}
        done = await finished(client, batch.id)
        assert done.status == "completed", done
        assert done.request_counts is not None
        assert (done.request_counts.total, done.request_counts.completed,
                done.request_counts.failed) == (10, 10, 0)
        assert done.error_file_id is None and done.completed_at is not None
        lines = await output_lines(client, done.output_file_id)
        assert [line["custom_id"] for line in lines] == list(texts)
        for line in lines:
            assert line["error"] is None and line["response"]["status_code"] == 200
            body = line["response"]["body"]
            expected = await client.embeddings.create(input=texts[line["custom_id"]],
                                                      model=DEFAULT_MODEL)
            assert [d["index"] for d in body["data"]] == [d.index for d in expected.data]
            for got, want in zip(body["data"], expected.data, strict=True):
                assert cosine(got["embedding"], want.embedding) >= 0.99999
        assert len({line["id"] for line in lines}) == len(lines)
        listed = await client.batches.list()
        assert [b.id for b in listed.data] == [batch.id]
        output = await client.files.retrieve(done.output_file_id or "")
        assert output.purpose == "batch_output"
        assert output.bytes == len((await client.files.content(output.id)).content)


async def test_a_batch_runs_on_a_redis_cluster(batch_settings: Settings, cluster_url: str
                                               ) -> None:
    on_cluster = batch_settings.replace(redis_url=cluster_url)
    lines = [request_line(f"c{i}", [f"cluster text {i}", f"and {i}"]) for i in range(5)]
    with live_server(on_cluster, with_mcp=False) as base:
        async with client_for(base) as client, running(on_cluster, HashEmbedder(on_cluster)):
            done = await finished(client, (await create(client, await upload(client, lines))).id)
            output = await output_lines(client, done.output_file_id)
            assert [f.id for f in (await client.files.list()).data] == [done.input_file_id]
    assert done.status == "completed" and done.request_counts is not None
    assert done.request_counts.completed == 5
    assert [len(line["response"]["body"]["data"]) for line in output] == [2] * 5


async def test_base64_requests_come_back_as_base64_like_v1_embeddings(
    batch_settings: Settings, client: AsyncOpenAI
) -> None:
    file_id = await upload(client, [request_line("a", "encode me", encoding_format="base64",
                                                 dimensions=8)])
    async with running(batch_settings, HashEmbedder(batch_settings)):
        done = await finished(client, (await create(client, file_id)).id)
        [line] = await output_lines(client, done.output_file_id)
        direct = await client.embeddings.create(input="encode me", model=DEFAULT_MODEL,
                                                dimensions=8, encoding_format="base64")
    body = line["response"]["body"]
    assert body["data"][0]["embedding"] == direct.data[0].embedding


async def test_bad_lines_fail_the_batch_with_openai_shaped_errors(client: AsyncOpenAI) -> None:
    good = request_line("ok", "fine")
    lines: list[Any] = [
        good,
        b"{not json",
        {**good, "custom_id": "u", "url": "/v1/chat/completions"},
        {**good, "custom_id": "m", "method": "GET"},
        {k: v for k, v in good.items() if k != "custom_id"},
        good,
        b"",
        request_line("other-model", "x", model="another-model"),
        request_line("other-options", "x", dimensions=8),
        request_line("empty", ""),
        {**good, "custom_id": "big", "body": {"input": "y" * (4 * 1024 * 1024)}},
    ]
    batch = await create(client, await upload(client, lines))
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.code, e.line) for e in batch.errors.data] == [
        ("invalid_json_line", 2), ("url_mismatch", 3), ("invalid_method", 4),
        ("missing_required_parameter", 5), ("duplicate_custom_id", 6),
        ("model_mismatch", 8), ("options_mismatch", 9), ("invalid_request", 10),
        ("line_too_large", 11)]
    assert all(e.message for e in batch.errors.data)
    assert batch.errors.data[3].param == "custom_id"
    assert batch.output_file_id is None and batch.error_file_id is None
    empty = await create(client, await upload(client, [b"", b"  "]))
    assert empty.status == "failed" and empty.errors is not None
    assert [e.code for e in empty.errors.data or []] == ["empty_file"]


async def test_a_model_no_worker_serves_fails_the_batch_naming_the_first_line(
    client: AsyncOpenAI
) -> None:
    file_id = await upload(client, [b"", request_line("a", "x", model="no-such-model")])
    batch = await create(client, file_id)
    assert batch.status == "failed" and batch.errors is not None
    [error] = batch.errors.data or []
    assert error.line == 2 and "no-such-model" in (error.message or "")


async def test_wrong_endpoints_windows_and_files_are_refused_at_once(client: AsyncOpenAI) -> None:
    file_id = await upload(client, [request_line("a", "x")])
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        await client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                    completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        await client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings",
                                    completion_window="1h")  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        await create(client, "file-" + "0" * 32)
    with pytest.raises(openai.BadRequestError, match="purpose"):
        await client.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")),
                                  purpose="fine-tune")


async def test_another_key_cannot_see_the_batch_or_its_files(
    batch_settings: Settings, client: AsyncOpenAI, base_url: str
) -> None:
    alice, bob = client, client_for(base_url, BOB)
    file_id = await upload(alice, [request_line("a", "mine")])
    async with running(batch_settings, HashEmbedder(batch_settings)):
        done = await finished(alice, (await create(alice, file_id)).id)
    assert done.output_file_id is not None
    for call in (bob.batches.retrieve(done.id), bob.batches.cancel(done.id),
                 bob.files.retrieve(file_id), bob.files.content(file_id),
                 bob.files.delete(file_id), bob.files.retrieve(done.output_file_id),
                 bob.files.content(done.output_file_id), create(bob, file_id)):
        with pytest.raises(openai.NotFoundError):
            await call
    assert (await bob.batches.list()).data == [] and (await bob.files.list()).data == []
    assert [b.id for b in (await alice.batches.list()).data] == [done.id]
    assert (await alice.files.retrieve(file_id)).id == file_id
    await bob.close()


async def test_a_cancelled_batch_puts_its_unrun_requests_in_the_error_file(
    client: AsyncOpenAI
) -> None:
    batch = await create(client, await upload(client, [request_line(f"r{i}", f"t {i}")
                                                       for i in range(6)]))
    assert batch.status == "in_progress"  # no worker: it waits
    cancelled = await client.batches.cancel(batch.id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
    assert cancelled.output_file_id is None
    lines = await output_lines(client, cancelled.error_file_id)
    assert [line["custom_id"] for line in lines] == [f"r{i}" for i in range(6)]
    assert {line["error"]["code"] for line in lines} == {"batch_cancelled"}
    assert all(line["response"] is None for line in lines)


async def test_a_request_with_a_failed_input_goes_to_the_error_file(
    batch_settings: Settings, client: AsyncOpenAI
) -> None:
    file_id = await upload(client, [request_line("good", ["a", "b"]),
                                    request_line("bad", ["c", f"{POISON} d"]),
                                    request_line("also-good", "e")])
    async with running(batch_settings, PoisonEmbedder(batch_settings)):
        done = await finished(client, (await create(client, file_id)).id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    assert [x["custom_id"] for x in await output_lines(client, done.output_file_id)] == [
        "good", "also-good"]
    [error] = await output_lines(client, done.error_file_id)
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 422
    assert "input 1 could not be embedded" in error["response"]["body"]["error"]["message"]


async def test_files_list_page_by_after_and_deleted_files_are_gone(client: AsyncOpenAI) -> None:
    ids = [await upload(client, [request_line("a", "x")], f"f{i}.jsonl") for i in range(3)]
    first = await client.files.list(limit=2)
    assert [f.id for f in first.data] == ids[::-1][:2] and first.has_more
    second = await client.files.list(limit=2, after=first.data[-1].id)
    assert [f.id for f in second.data] == [ids[0]] and not second.has_more
    assert [f.id async for f in client.files.list(limit=1)] == ids[::-1]
    deleted = await client.files.delete(ids[1])
    assert deleted.deleted and deleted.id == ids[1]
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(ids[1])
    assert [f.id for f in (await client.files.list(order="asc")).data] == [ids[0], ids[2]]
    content = await client.files.content(ids[0])
    assert content.content == jsonl([request_line("a", "x")])


async def test_a_key_over_its_file_quota_is_refused_and_keeps_what_it_had(
    client: AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files_module, "MAX_FILES_PER_KEY", 2)
    kept = [await upload(client, [request_line("a", "x")]) for _ in range(2)]
    with pytest.raises(openai.APIStatusError, match="delete some") as refused:
        await upload(client, [request_line("a", "x")])
    assert refused.value.status_code == 413
    assert sorted(f.id for f in (await client.files.list()).data) == sorted(kept)


async def test_only_the_file_upload_takes_multipart_bodies(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url,
                                 headers={"Authorization": f"Bearer {ALICE}"}) as http:
        refused = await http.post("/v1/jobs", files={"file": ("a.txt", b"hello")})
        taken = await http.post("/v1/files", files={"file": ("a.jsonl", b"{}")},
                                data={"purpose": "batch"})
    assert refused.status_code == 415 and taken.status_code == 200, taken.text


async def test_batches_list_page_by_after(client: AsyncOpenAI) -> None:
    file_id = await upload(client, [b"not json"])
    ids = [(await create(client, file_id)).id for _ in range(3)]
    first = await client.batches.list(limit=2)
    assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
    rest = await client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in rest.data] == [ids[0]] and not rest.has_more
    assert [b.id async for b in client.batches.list(limit=1)] == ids[::-1]


async def test_a_batch_survives_a_server_restart_mid_run(
    batch_settings: Settings, tmp_path: Path
) -> None:
    url, env = batch_settings.redis_url or "", {"EMBEDSTREAM_API_KEYS": ALICE}
    gate = GateEmbedder(batch_settings)
    lines = [request_line(f"r{i}", f"restart text {i}") for i in range(12)]
    server, base = await anyio.to_thread.run_sync(lambda: start_server(url, tmp_path, **env))
    try:
        async with running(batch_settings, gate):
            async with client_for(base) as client:
                batch = await create(client, await upload(client, lines))
            with anyio.fail_after(10):
                while not gate.entered.is_set():  # the worker holds the first chunk
                    await anyio.sleep(0.02)
            server.kill()
            gate.open()
            server, base = await anyio.to_thread.run_sync(
                lambda: start_server(url, tmp_path, **env))
            async with client_for(base) as client:
                done = await finished(client, batch.id)
                output = await output_lines(client, done.output_file_id)
    finally:
        server.stop()
    assert done.status == "completed"
    assert [line["custom_id"] for line in output] == [f"r{i}" for i in range(12)]


def rss_kib(pid: int, field: str = "VmHWM") -> int:
    """The process's peak (VmHWM) or current (VmRSS) resident memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field}")


async def big_file() -> AsyncIterator[bytes]:
    filler = "a sentence of quite ordinary length to embed in bulk, with a few more words, no. "
    for start in range(0, 100_000, 10_000):
        yield jsonl([request_line(f"req-{i}", f"{filler}{i}") for i in range(start,
                                                                              start + 10_000)])


async def test_a_100000_line_upload_stays_under_200_mb_of_server_rss(
    batch_settings: Settings, tmp_path: Path
) -> None:
    body = b"".join([part async for part in big_file()])
    assert len(body) > 15_000_000
    server, base = start_server(batch_settings.redis_url or "", tmp_path,
                                EMBEDSTREAM_API_KEYS=ALICE)
    try:
        before_mib = rss_kib(server.popen.pid, "VmRSS") / 1024
        async with client_for(base) as client:
            stored = await client.files.create(file=("big.jsonl", io.BytesIO(body)),
                                               purpose="batch")
            del body
            batch = await create(client, stored.id)
        assert batch.status == "in_progress", batch.errors
        assert batch.request_counts is not None and batch.request_counts.total == 100_000
        peak_mib = rss_kib(server.popen.pid) / 1024
    finally:
        server.stop()
    print(f"server RSS {before_mib:.0f} MiB before, peak {peak_mib:.0f} MiB after a "
          f"{stored.bytes} byte upload and its batch")
    assert peak_mib < 200, os.linesep + server.log()[-2000:]
