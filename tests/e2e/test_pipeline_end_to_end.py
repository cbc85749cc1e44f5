"""The whole pipeline through real processes and sockets, with the real model.

One server and two workers run for the module against a Valkey of their own;
each test submits its jobs over REST and reads results over SSE, as a client
would.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from scipy.stats import spearmanr

from pipeline.store.embedded import EmbeddedRedis
from tests.support.processes import Process, start_server, start_worker, wait_for_workers
from tests.support.sse_client import read_events
from tests.support.sts_data import STS_DIR

STS = STS_DIR

pytestmark = pytest.mark.slow


def sts_pairs(split: str) -> tuple[list[str], list[str], list[float]]:
    """(sentence1s, sentence2s, gold scores) of an STS-B split."""
    first, second, scores = [], [], []
    with (STS / f"sts-{split}.csv").open(encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            first.append(row[5])
            second.append(row[6])
            scores.append(float(row[4]))
    return first, second, scores


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server and two workers on a Valkey of their own; yields the base URL."""
    root = tmp_path_factory.mktemp("stack")
    processes: list[Process] = []
    with EmbeddedRedis(root / "redis", binary="valkey") as redis_server:
        try:
            processes += [start_worker(redis_server.url, root, name) for name in ("a", "b")]
            server, base = start_server(redis_server.url, root)
            processes.append(server)
            wait_for_workers(base, 2)
            yield base
        finally:
            for process in processes:
                process.stop()


def submit(base: str, inputs: list[Any], **options: Any) -> str:
    reply = httpx.post(f"{base}/v1/jobs", json={"inputs": inputs, **options}, timeout=60)
    assert reply.status_code == 202, reply.text
    return str(reply.json()["id"])


def stream_results(
    base: str, job_id: str, after: str | None = None, stop_after: int | None = None
) -> tuple[dict[int, list[float]], list[str], dict[str, Any] | None, str | None]:
    """Read a job's SSE stream: (rows by index, event names, end data, last event id)."""
    rows: dict[int, list[float]] = {}
    names: list[str] = []
    end = None
    last_id = None
    headers = {"Last-Event-ID": after} if after else {}
    with httpx.stream("GET", f"{base}/v1/jobs/{job_id}/events", headers=headers,
                      timeout=httpx.Timeout(10, read=120)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in read_events(response):
            names.append(event.event)
            last_id = event.id
            if event.event == "result":
                for row in event.data:
                    assert row["index"] not in rows, f"index {row['index']} delivered twice"
                    rows[row["index"]] = row["embedding"]
                if stop_after is not None and len(rows) >= stop_after:
                    break  # drop the connection mid-job
            elif event.event == "end":
                end = event.data
    return rows, names, end, last_id


# The real model embeds the STS dev set twice, through the pipeline and directly: ~40 s
# on 2 cores.
@pytest.mark.timeout(180)
def test_sts_dev_through_the_pipeline_matches_direct_encoding(stack: str) -> None:
    from sentence_transformers import SentenceTransformer

    from pipeline.model.info import bundled_model_dir

    first, second, gold = sts_pairs("dev")
    texts = first + second
    job_id = submit(stack, texts)
    rows, names, end, _ = stream_results(stack, job_id)

    assert end is not None and end["status"] == "completed" and end["done"] == len(texts)
    assert names[-1] == "end" and "progress" in names
    served = httpx.get(f"{stack}/v1/models", timeout=10).json()["data"][0]
    assert end["backend"] == served["backend"]  # what `auto` chose, as the job records it
    assert served["backend_reason"].startswith(f"auto: {served['backend']}, the fastest")
    assert sorted(rows) == list(range(len(texts)))
    got = np.array([rows[i] for i in range(len(texts))], dtype=np.float32)
    direct = SentenceTransformer(str(bundled_model_dir()), device="cpu").encode(texts)
    cosine = (got * direct).sum(1) / (np.linalg.norm(got, axis=1) *
                                      np.linalg.norm(direct, axis=1))
    assert cosine.min() >= 0.9999  # the bound `auto` chooses by (onnx alone: 0.99999)

    def sts_spearman(vectors: np.ndarray[Any, Any]) -> float:
        a, b = vectors[: len(first)], vectors[len(first):]
        sims = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        return float(spearmanr(sims, gold).statistic)

    assert abs(sts_spearman(got) - sts_spearman(direct)) <= 0.001


def test_two_workers_deliver_every_index_of_a_4000_text_job_exactly_once(stack: str) -> None:
    first, second, _ = sts_pairs("train")
    texts = (first + second)[:4000]
    job_id = submit(stack, texts)
    rows, _, end, _ = stream_results(stack, job_id)
    assert end is not None and end["status"] == "completed"
    assert sorted(rows) == list(range(4000))
    page_indexes: list[int] = []
    cursor = None
    while True:
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{stack}/v1/jobs/{job_id}/results", params=params, timeout=30).json()
        page_indexes += [r["index"] for r in page["results"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert page_indexes == list(range(4000))


def test_sse_client_resuming_with_last_event_id_gets_the_rest_exactly_once(stack: str) -> None:
    first, _, _ = sts_pairs("train")
    texts = first[:1500]
    job_id = submit(stack, texts)
    before, _, end, last_id = stream_results(stack, job_id, stop_after=200)
    assert end is None and last_id is not None
    after, names, end, _ = stream_results(stack, job_id, after=last_id)
    assert end is not None and names[-1] == "end"
    assert not set(before) & set(after), "a resumed stream repeated results"
    assert sorted({*before, *after}) == list(range(len(texts)))

    # ?after= resumes the same way, and after the end event only `end` remains.
    again, _, _, end_id = stream_results(stack, job_id, after=last_id)
    assert set(again) == set(after)
    rest, names, end, _ = stream_results(stack, job_id, after=end_id)
    assert rest == {} and names == ["end"] and end is not None


def test_the_official_openai_client_gets_the_same_vectors_as_rest(stack: str) -> None:
    from openai import OpenAI

    texts = ["The cat sat on the mat.", "Stock markets fell sharply today."]
    with OpenAI(base_url=f"{stack}/v1", api_key="unused", max_retries=0) as client:
        # The client asks for base64 unless told otherwise, and decodes it itself.
        default = client.embeddings.create(input=texts, model="all-MiniLM-L6-v2")
        floats = client.embeddings.create(input=texts[0], model="all-MiniLM-L6-v2",
                                          encoding_format="float", dimensions=128)
    assert [d.index for d in default.data] == [0, 1]
    assert default.usage.prompt_tokens > 0 and default.model == "all-MiniLM-L6-v2"
    assert len(floats.data[0].embedding) == 128

    job_id = submit(stack, texts)
    rows, _, _, _ = stream_results(stack, job_id)
    for i, item in enumerate(default.data):
        assert np.allclose(item.embedding, rows[i], atol=1e-6)
    truncated = np.asarray(rows[0][:128]) / np.linalg.norm(rows[0][:128])
    assert np.allclose(floats.data[0].embedding, truncated, atol=1e-6)


def feed_until(base: str, job_id: str, headers: dict[str, str] | None = None) -> list[Any]:
    """Live-feed events until `job_id` completes."""
    seen = []
    with httpx.stream("GET", f"{base}/v1/events", headers=headers or {},
                      timeout=httpx.Timeout(10, read=60)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for event in read_events(response):
            seen.append(event)
            if event.event == "job.completed" and event.data["id"] == job_id:
                break
    return seen


def test_the_live_feed_shows_a_job_with_stats_and_resumes_without_repeats(stack: str) -> None:
    job_id = submit(stack, [f"feed sentence {i}" for i in range(100)])
    seen = feed_until(stack, job_id)
    mine = [e for e in seen if e.event.startswith("job.") and e.data["id"] == job_id]
    assert mine[0].event == "job.created" and mine[-1].event == "job.completed"
    assert mine[-1].data["done"] == 100
    assert mine[-1].data["backend"] == httpx.get(f"{stack}/v1/jobs/{job_id}").json()["backend"]
    assert mine[-1].data["backend"]
    stats = [e for e in seen if e.event == "stats"]
    assert stats and stats[0].data["workers"] == 2
    assert {"queued_chunks", "running_chunks", "texts_total", "texts_per_s"} <= set(stats[0].data)
    assert all("embedding" not in str(e.data) for e in seen)

    created = mine[0]
    resumed = feed_until(stack, job_id, {"Last-Event-ID": created.id})
    expected = [e.id for e in seen[seen.index(created) + 1:] if e.event != "stats"]
    assert [e.id for e in resumed if e.event != "stats"] == expected
