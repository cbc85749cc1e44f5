"""A stopping worker drains: the model call in hand is committed, the rest handed back.

In-process workers with fake embedders against a real server; the
real-process SIGTERM cases are in tests/e2e/test_worker_signals.py.
"""

from collections import Counter

import anyio
import pytest

from pipeline.keys import GROUP
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import GateEmbedder, HashEmbedder
from tests.support.workers import (
    BULK,
    KEYS,
    assert_every_index_once,
    create_groups,
    feed_events,
    running,
    submit,
    texts_of,
    wait_end,
    wait_entered,
)

pytestmark = pytest.mark.anyio


async def test_a_stopped_worker_commits_its_model_call_and_hands_back_the_rest(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    # Six chunks of four in one claim: a resumed consumer's own pending entries,
    # each redelivered, so each embedded alone. The stop comes during the first.
    patient = fast_settings.replace(visibility_timeout_s=60.0)
    client = pipeline.redis
    await create_groups(client)
    texts = texts_of(1, 24)
    job_id = await submit(pipeline, texts)
    await client.xreadgroup(GROUP, "worker-7", {BULK: ">"}, count=6)
    gate = GateEmbedder(patient)
    try:
        async with running(patient, gate, worker_id="worker-7") as run:
            await wait_entered(gate)
            run.stop.set()
            gate.open()
            with anyio.fail_after(10):
                await run.task
    finally:
        gate.open()
    assert gate.calls == [[text] for text in texts[:4]]
    job = await pipeline.job(job_id)
    assert (job.status, job.done) == ("running", 4)
    # The five chunks never started are pending, idle past the timeout, and the
    # delivery that was no attempt is not counted.
    rows = await client.xpending_range(BULK, GROUP, "-", "+", 10)
    assert [(r["consumer"], r["times_delivered"]) for r in rows] == [(b"worker-7", 1)] * 5
    assert all(r["time_since_delivered"] >= 60_000 for r in rows)
    assert not await client.hexists(KEYS.workers, "worker-7")
    downs = [d for t, d in await feed_events(client) if t == "worker.down"]
    assert downs == [{"id": "worker-7", "reason": "stopped"}]

    peer = HashEmbedder(patient)  # a minute's visibility timeout: only a release explains it
    async with running(patient, peer):
        await wait_end(pipeline, job_id, timeout_s=10)
    await assert_every_index_once(pipeline, job_id, texts)
    assert Counter(peer.embedded_texts) == Counter(texts[4:])
