"""OpenTelemetry traces of a request across server, queue, worker and server again.

One trace per request:

    POST /v1/jobs (traceparent: the caller's)     server
      submit                                      PRODUCER; its traceparent goes into every
                                                  queue entry (`tp`) and the job hash
    batch  (a root; a link per entry it serves)   worker, CONSUMER, `messaging.*` attributes
      model.call                                  each call of the model
      commit                                      the batch's commit scripts and acks
    deliver (child of the job's submit span)      server: one per SSE stream, events counted;
                                                  the reply of an interactive request

`EMBEDSTREAM_TRACING` (`configure`) picks the exporter: `off` (the default)
installs nothing, `console` writes spans to stderr, `otlp` sends them to
the endpoint the standard `OTEL_EXPORTER_OTLP_*` variables name (the `otlp`
extra brings the exporter). `OTEL_TRACES_SAMPLER` and `OTEL_BSP_*` are
honoured as the SDK reads them.

Deliberate choices, so nobody "fixes" them:

- The tracer is held by this module, not passed down: a tracer provider is
  process-wide in OpenTelemetry itself, and the hooks sit in a dozen places.
  Off, it is None and every helper returns before making a span or reading
  a context (a shared `nullcontext`, about 0.2 µs a hook), and queue entries
  and job hashes carry no trace field at all.
- `configure` also installs the provider as OpenTelemetry's global one, so
  the MCP SDK's `tools/call` spans (parented by `params._meta.traceparent`)
  land in the same traces and our `submit` spans nest under them. Tests
  install a provider with `use` alone, which they can undo.
- A batch serves many requests, so its span is a root with a link to each
  entry's submit span (the messaging conventions for batch processing), not
  a child of any of them. Each link carries the entry's id and how long it
  waited in the queue (from the time in its stream id to the start of its
  batch); the batch carries the longest wait.
- Only `traceparent` crosses the queue; a caller's `tracestate` stays on the
  server's spans.
- Console spans go to stderr: stdout is `embedstream mcp`'s protocol.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, ParamSpec, Protocol, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.util.types import Attributes

    from pipeline.settings import Settings

SERVER = "embedstream-server"
WORKER = "embedstream-worker"
MODES = ("off", "otlp", "console")
ENTRY_FIELD = "tp"  # a queue entry's traceparent, present only when tracing is on
_ENTRY_KEY = ENTRY_FIELD.encode()
MESSAGING = {"messaging.system": "redis"}

P = ParamSpec("P")
T = TypeVar("T")
E = TypeVar("E")

_propagator = TraceContextTextMapPropagator()
_NOTHING = contextlib.nullcontext()  # what every span helper returns when tracing is off
_tracer: trace.Tracer | None = None  # None: tracing is off


class HasHeaders(Protocol):
    """A request: something with headers (a Starlette `Request`)."""

    @property
    def headers(self) -> Mapping[str, str]: ...


R = TypeVar("R", bound=HasHeaders)


class QueueEntry(Protocol):
    """What a batch span reads of a claimed queue entry (`workers.work.Entry`)."""

    @property
    def stream(self) -> str: ...

    @property
    def entry_id(self) -> bytes: ...

    @property
    def job_id(self) -> str: ...

    @property
    def traceparent(self) -> str: ...


def configure(settings: Settings, service: str) -> None:
    """Set this process's tracing up from `settings.tracing`, once; `off` installs nothing."""
    mode = settings.tracing.strip().lower()
    if mode not in MODES:
        raise PipelineError(f"EMBEDSTREAM_TRACING must be one of {', '.join(MODES)}, "
                            f"not {settings.tracing!r}")
    if mode == "off" or _tracer is not None:
        return
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    provider.add_span_processor(BatchSpanProcessor(_exporter(mode)))
    trace.set_tracer_provider(provider)
    use(provider)


def _exporter(mode: str) -> SpanExporter:
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    if mode == "console":
        return ConsoleSpanExporter(out=sys.stderr)
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise PipelineError(
            "EMBEDSTREAM_TRACING=otlp needs the OTLP exporter, which is not installed: "
            "pip install 'embedstream[otlp]'") from None
    return OTLPSpanExporter()


def use(provider: trace.TracerProvider | None) -> None:
    """Trace through `provider` from now on; None turns tracing off."""
    global _tracer
    _tracer = provider.get_tracer("embedstream") if provider is not None else None


def enabled() -> bool:
    """Whether spans are made in this process."""
    return _tracer is not None


def traceparent() -> str:
    """The current span's W3C `traceparent`, or "" (tracing off, or no span)."""
    if _tracer is None:
        return ""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent", "")


def context_of(traceparent: str, tracestate: str = "") -> Context | None:
    """The context a W3C `traceparent` (and `tracestate`) names; None if absent or malformed."""
    if not traceparent:
        return None
    found = _propagator.extract({"traceparent": traceparent, "tracestate": tracestate})
    return found if trace.get_current_span(found).get_span_context().is_valid else None


def entry_fields() -> dict[str | bytes, str]:
    """The trace field of a queue entry written now: `{"tp": traceparent}`, or {} when off.

    Keyed `str | bytes` as redis-py types an entry's fields, so it unpacks into them."""
    parent = traceparent()
    return {ENTRY_FIELD: parent} if parent else {}


def entry_traceparent(fields: Mapping[bytes, bytes]) -> str:
    """The traceparent a queue entry carries, or ""."""
    raw = fields.get(_ENTRY_KEY)
    return raw.decode(errors="replace") if raw else ""


def continues(handler: Callable[[R], Awaitable[T]]) -> Callable[[R], Awaitable[T]]:
    """Run a request handler in the trace its request's `traceparent` header names."""

    @functools.wraps(handler)
    async def handle(request: R) -> T:
        headers = request.headers
        parent = None if _tracer is None else context_of(headers.get("traceparent", ""),
                                                         headers.get("tracestate", ""))
        if parent is None:
            return await handler(request)
        token = otel_context.attach(parent)
        try:
            return await handler(request)
        finally:
            otel_context.detach(token)

    return handle


def span(name: str, attributes: Attributes = None) -> AbstractContextManager[object]:
    """An internal span `name`, child of the current one and current in the block."""
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(name, attributes=attributes)


def submitting(attributes: Attributes = None) -> AbstractContextManager[object]:
    """The `submit` span of a job or an interactive request: what its queue entries carry."""
    if _tracer is None:
        return _NOTHING
    return _tracer.start_as_current_span(
        "submit", kind=SpanKind.PRODUCER,
        attributes={**MESSAGING, **(attributes or {}), "messaging.operation.type": "send"})


def annotate(attributes: Mapping[str, str | int]) -> None:
    """Add attributes to the current span (when tracing is on)."""
    if _tracer is not None:
        trace.get_current_span().set_attributes(attributes)


def traced(name: str) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """Run an async function in a span `name`, child of the current one."""

    def wrap(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def call(*args: P.args, **kwargs: P.kwargs) -> T:
            if _tracer is None:
                return await fn(*args, **kwargs)
            with _tracer.start_as_current_span(name):
                return await fn(*args, **kwargs)

        return call

    return wrap


def batch(claimed: Iterable[QueueEntry]) -> AbstractContextManager[object]:
    """A batch's `process` span: a root linked to each entry's submit span (see above)."""
    if _tracer is None:
        return _NOTHING
    entries = list(claimed)
    now_ms = time.time() * 1000
    waits = [max(0.0, now_ms - int(e.entry_id.split(b"-")[0])) for e in entries]
    links = [Link(parent, {"messaging.message.id": e.entry_id.decode(),
                           "embedstream.job.id": e.job_id,
                           "embedstream.queue.wait_ms": round(wait, 1)})
             for e, wait in zip(entries, waits, strict=True)
             if (parent := _span_context(e.traceparent)) is not None]
    attributes: dict[str, str | int | float] = {
        **MESSAGING, "messaging.operation.type": "process",
        "messaging.batch.message_count": len(entries),
        "embedstream.queue.wait_ms.max": round(max(waits, default=0.0), 1)}
    streams = {e.stream for e in entries}
    if len(streams) == 1:
        attributes["messaging.destination.name"] = streams.pop()
    return _tracer.start_as_current_span("batch", context=Context(), kind=SpanKind.CONSUMER,
                                         links=links, attributes=attributes)


def _span_context(traceparent: str) -> trace.SpanContext | None:
    found = context_of(traceparent)
    return None if found is None else trace.get_current_span(found).get_span_context()


def delivering(events: AsyncGenerator[E, None], traceparent: str,
               attributes: Attributes = None) -> AsyncGenerator[E, None]:
    """`events` as they are, in a `deliver` span (child of `traceparent`) that counts them.

    The span is started and ended by hand, never made current: a generator
    that yields would leave it current in its reader's context.
    """
    if _tracer is None:
        return events
    return _counted(_tracer, events, context_of(traceparent), attributes)


async def _counted(tracer: trace.Tracer, events: AsyncGenerator[E, None], parent: Context | None,
                   attributes: Attributes) -> AsyncGenerator[E, None]:
    delivery = tracer.start_span("deliver", context=parent, attributes=attributes)
    count = 0
    try:
        async with contextlib.aclosing(events):
            async for event in events:
                count += 1
                yield event
    except Exception as exc:
        delivery.record_exception(exc)
        delivery.set_status(trace.StatusCode.ERROR, str(exc))
        raise
    finally:
        delivery.set_attribute("embedstream.events", count)
        delivery.end()
