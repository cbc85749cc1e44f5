"""Traces across the queue: server (submit) -> Redis queue -> worker (batch) -> server (deliver).

Server and worker run in this one process, so one TracerProvider, recording into
memory, serves both (`tracing.use`, undone after each test); the test with
tracing off installs none.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import AsyncIterator, Iterator

import anyio
import pytest
from mcp import Client
from mcp.shared import _otel as sdk_otel
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from mcp_server.agents import build_mcp
from pipeline import PipelineError, tracing
from pipeline.inputs import Item, JobOptions
from pipeline.keys import Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.fakes import HashEmbedder
from tests.support.rest import parse_sse, serving
from tests.support.timings import quick
from tests.support.workers import create_groups, running

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
FAST, BULK = KEYS.queues(DEFAULT_MODEL)
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN = 0x00F067AA0BA902B7
TRACEPARENT = {"traceparent": f"00-{TRACE_ID:032x}-{CALLER_SPAN:016x}-01"}


@pytest.fixture
def provider() -> Iterator[TracerProvider]:
    """Tracing on for the test, through a provider of its own."""
    provider = TracerProvider()
    tracing.use(provider)
    try:
        yield provider
    finally:
        tracing.use(None)
        provider.shutdown()


@pytest.fixture
def spans(provider: TracerProvider) -> InMemorySpanExporter:
    """Every span the test's provider ends, kept in memory."""
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def traced_settings(settings: Settings) -> Settings:
    return quick(settings)


@contextlib.asynccontextmanager
async def reading(settings: Settings) -> AsyncIterator[Pipeline]:
    """A Pipeline of the test's own, to read Redis and ask as a server would."""
    pipeline = Pipeline(settings)
    try:
        yield pipeline
    finally:
        await pipeline.close()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def finished(exporter: InMemorySpanExporter, *names: str) -> None:
    """Wait until a span of each name has ended (a commit may end after its SSE stream)."""
    with anyio.fail_after(10):
        while not all(named(exporter, name) for name in names):
            await anyio.sleep(0.02)


def the_submit_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    """The one submit span, a child of the caller's span in the caller's trace."""
    [submit] = named(exporter, "submit")
    assert submit.context is not None
    assert submit.context.trace_id == TRACE_ID
    assert parent_id(submit) == CALLER_SPAN
    assert submit.kind is SpanKind.PRODUCER
    return submit


def the_batch_serving(exporter: InMemorySpanExporter, submit: ReadableSpan,
                      stream: str) -> ReadableSpan:
    """The batch span linked to `submit`: a root of its own, with its model calls and
    commit as children."""
    assert submit.context is not None
    linked = [b for b in named(exporter, "batch")
              if any(link.context.span_id == submit.context.span_id for link in b.links)]
    assert linked, "no batch span links to the submit span"
    batch = linked[0]
    assert batch.parent is None and batch.kind is SpanKind.CONSUMER
    assert batch.context is not None and batch.context.trace_id != TRACE_ID
    assert batch.attributes is not None
    assert batch.attributes["messaging.system"] == "redis"
    assert batch.attributes["messaging.operation.type"] == "process"
    assert batch.attributes["messaging.destination.name"] == stream
    link = next(link for link in batch.links if link.context.span_id == submit.context.span_id)
    assert link.context.trace_id == TRACE_ID
    assert link.attributes is not None and link.attributes["embedstream.queue.wait_ms"] >= 0
    span_id = batch.context.span_id
    assert any(parent_id(s) == span_id for s in named(exporter, "model.call"))
    assert any(parent_id(s) == span_id for s in named(exporter, "commit"))
    return batch


async def test_a_jobs_trace_runs_from_the_request_through_the_worker_to_its_event_stream(
    traced_settings: Settings, spans: InMemorySpanExporter
) -> None:
    texts = [f"traced text {i}" for i in range(8)]  # 2 chunks of 4: one bulk batch
    async with serving(traced_settings) as client, \
            running(traced_settings, HashEmbedder(traced_settings)):
        response = await client.post("/v1/jobs", json={"inputs": texts}, headers=TRACEPARENT)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        with anyio.fail_after(15):
            events = parse_sse((await client.get(f"/v1/jobs/{job_id}/events")).text)
        assert events[-1]["event"] == "end"
        await finished(spans, "submit", "batch", "model.call", "commit", "deliver")
    async with reading(traced_settings) as pipeline:
        entries = await pipeline.redis.xrange(BULK)
        job = await pipeline.job(job_id)

    submit = the_submit_span(spans)
    assert submit.context is not None and submit.attributes is not None
    assert submit.attributes["embedstream.job.id"] == job_id
    stored = f"00-{TRACE_ID:032x}-{submit.context.span_id:016x}-01"
    assert [fields[b"tp"].decode() for _, fields in entries] == [stored, stored]
    assert job.traceparent == stored
    batch = the_batch_serving(spans, submit, BULK)
    assert batch.attributes is not None and batch.attributes["messaging.batch.message_count"] == 2
    [deliver] = named(spans, "deliver")
    assert deliver.context is not None and deliver.context.trace_id == TRACE_ID
    assert parent_id(deliver) == submit.context.span_id
    assert deliver.attributes is not None
    assert deliver.attributes["embedstream.events"] == len(events)


async def test_an_interactive_requests_trace_runs_through_the_worker_to_its_reply(
    traced_settings: Settings, spans: InMemorySpanExporter
) -> None:
    async with serving(traced_settings) as client, \
            running(traced_settings, HashEmbedder(traced_settings)):
        with anyio.fail_after(15):
            response = await client.post("/v1/embeddings", json={"input": ["one", "two"]},
                                         headers=TRACEPARENT)
        assert response.status_code == 200, response.text
        await finished(spans, "submit", "batch", "model.call", "commit", "deliver")

    submit = the_submit_span(spans)
    assert submit.context is not None
    the_batch_serving(spans, submit, FAST)
    [deliver] = named(spans, "deliver")
    assert deliver.context is not None and deliver.context.trace_id == TRACE_ID
    assert parent_id(deliver) == submit.context.span_id


async def test_without_a_traceparent_a_submission_starts_a_trace_of_its_own(
    traced_settings: Settings, spans: InMemorySpanExporter
) -> None:
    async with serving(traced_settings) as client:
        response = await client.post("/v1/jobs", json={"inputs": ["alone"]})
        assert response.status_code == 202, response.text
    [submit] = named(spans, "submit")
    assert submit.parent is None


async def test_with_tracing_off_queue_entries_and_jobs_carry_no_trace_field(
    traced_settings: Settings,
) -> None:
    assert not tracing.enabled()
    async with serving(traced_settings) as client:
        response = await client.post("/v1/jobs", json={"inputs": ["a", "b", "c", "d", "e"]},
                                     headers=TRACEPARENT)
        assert response.status_code == 202, response.text
    async with reading(traced_settings) as pipeline:
        job_fields = await pipeline.redis.hkeys(KEYS.job(response.json()["id"]))
        job_entries = await pipeline.redis.xrange(BULK)
        await create_groups(pipeline.redis)
        asked = anyio.Event()

        async def ask() -> None:
            await pipeline.embed([Item("query")], JobOptions())
            asked.set()

        async with anyio.create_task_group() as group:
            group.start_soon(ask)
            with anyio.fail_after(10):
                while not await pipeline.redis.xlen(FAST):
                    await anyio.sleep(0.01)
            request_entries = await pipeline.redis.xrange(FAST)
            async with running(traced_settings, HashEmbedder(traced_settings)):
                with anyio.fail_after(10):
                    await asked.wait()

    assert b"traceparent" not in job_fields
    assert [set(fields) for _, fields in job_entries] == [{b"job", b"chunk", b"n"}] * 2
    [(_, request)] = request_entries
    assert b"tp" not in request and b"req" in request


def test_a_traceparent_names_its_context_and_a_malformed_one_names_none() -> None:
    parent = tracing.context_of(TRACEPARENT["traceparent"])
    assert parent is not None
    for bad in ("", "00-zz-00f067aa0ba902b7-01", f"00-{0:032x}-{CALLER_SPAN:016x}-01"):
        assert tracing.context_of(bad) is None


def test_an_unknown_tracing_mode_is_refused_naming_the_choices(settings: Settings) -> None:
    with pytest.raises(PipelineError, match="must be one of off, otlp, console, not 'jaeger'"):
        tracing.configure(settings.replace(tracing="jaeger"), tracing.SERVER)
    assert not tracing.enabled()


async def test_an_mcp_tool_calls_traceparent_in_its_meta_parents_the_submission(
    traced_settings: Settings, provider: TracerProvider, spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The SDK traces through OpenTelemetry's global provider, which `tracing.configure`
    # sets and a test cannot unset: its tracer is pointed at this test's provider instead.
    monkeypatch.setattr(sdk_otel, "_tracer", provider.get_tracer("mcp"))
    async with reading(traced_settings) as pipeline, \
            Client(build_mcp(traced_settings, pipeline)) as client:
        caller = tracing.context_of(TRACEPARENT["traceparent"])
        assert caller is not None
        token = otel_context.attach(caller)  # the client injects it as params._meta.traceparent
        try:
            result = await client.call_tool("submit_job", {"inputs": ["a", "b"]})
        finally:
            otel_context.detach(token)
    assert not result.is_error, result.content
    [handled] = named(spans, "tools/call submit_job")
    [submit] = named(spans, "submit")
    assert handled.parent is not None and handled.parent.is_remote  # read from params._meta
    assert parent_id(handled) == CALLER_SPAN
    assert handled.context is not None and handled.context.trace_id == TRACE_ID
    assert submit.context is not None and submit.context.trace_id == TRACE_ID
    assert parent_id(submit) == handled.context.span_id


def test_otlp_without_its_exporter_is_refused_naming_the_extra(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # None in sys.modules makes the import fail as if the package were not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter",
                        None)
    with pytest.raises(PipelineError, match=re.escape("pip install 'embedstream[otlp]'")):
        tracing.configure(settings.replace(tracing="otlp"), tracing.WORKER)
    assert not tracing.enabled()
