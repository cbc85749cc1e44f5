"""Probes and metrics: /healthz (alive), /readyz (Redis and a worker), /metrics.

Pipeline-wide figures (queues, workers, texts embedded, and what workers
record in `keys.metrics`: batch sizes, embedding durations, inputs given up
on, cache hits and misses) are read from Redis at scrape time, so every
server replica reports the same numbers. Figures of the serving process
itself (requests by route and status, SSE subscribers) are counted here, per
replica, as Prometheus expects of a per-instance scrape target.

Every name starts with `embedstream_`. Every label takes its value from a
known, finite set, so no request can add a series: the route is the matched
route's template ("unmatched" when none), the method one of the standard
ones or "other" (uvicorn accepts any token as a method), the status a known
HTTP status or "other". Requests are counted before the Host check and
auth, so these bounds hold for anyone who can reach the port.

With API keys set, /metrics answers admins and `settings.metrics_token`
only (403 for any other key): cache hits and misses, read before and after
a request, would tell one tenant whether another embedded a text.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_server.auth import may_scrape
from mcp_server.http_errors import error_response
from mcp_server.payloads import pipeline_of
from mcp_server.responses import json_response
from pipeline import Keys, Unavailable
from pipeline.store import (
    Histogram,
    Partitions,
    RedisClient,
    lanes,
    live_workers,
    read_metrics,
    redis_outage,
)

COUNTER_HELP = {
    "batches": "Model calls made by workers",
    "inputs_given_up": "Inputs failed as poison after too many deliveries",
    "cache_hits": "Texts served from the embedding cache",
    "cache_misses": "Texts the embedding cache did not hold",
}
HISTOGRAM_HELP = {
    "batch_texts": "Texts per model call",
    "batch_tokens": "Tokens per model call",
    "embed_seconds": "Seconds per model call",
}
SSE_PATHS = {"/v1/events": "feed", "/v1/jobs/{job_id}/events": "job"}
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
STATUSES = frozenset(str(status.value) for status in HTTPStatus)


async def healthz(request: Request) -> Response:
    """The process is alive."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 when Redis answers and at least one worker is alive, else 503."""
    try:
        state = await pipeline_of(request).ready()
    except (Unavailable, RedisError, OSError) as exc:
        return json_response({"status": "unavailable", "redis": False, "workers": 0,
                              "error": f"Redis unreachable: {exc}"}, 503)
    ready = state.workers > 0
    return json_response({"status": "ready" if ready else "no_workers", "redis": state.redis,
                          "workers": state.workers}, 200 if ready else 503)


class _Snapshot:
    """The pipeline-wide figures of one scrape, rendered as metric families."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        yield from self.families


class PrometheusRegistry:
    """This app's registry: per-process counters, plus a snapshot refilled from Redis."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.snapshot = _Snapshot()
        self.registry.register(self.snapshot)
        self.requests = Counter("embedstream_http_requests", "HTTP requests answered",
                                ["route", "method", "status"], registry=self.registry)
        self.subscribers = Gauge("embedstream_sse_subscribers", "Open SSE streams",
                                 ["stream"], registry=self.registry)
        for stream in SSE_PATHS.values():
            self.subscribers.labels(stream)
        self._last_rate: tuple[float, float] | None = None

    async def refresh(self, redis: RedisClient, keys: Keys, partitions: Partitions) -> None:
        """Read the pipeline-wide figures from Redis into the snapshot."""
        families: list[Metric] = []
        families += await _queue_families(redis, keys, partitions)
        workers = await live_workers(redis, keys)
        families.append(GaugeMetricFamily("embedstream_workers", "Live workers",
                                          value=len(workers)))
        texts = float(await redis.get(keys.texts_counter) or 0)
        families.append(CounterMetricFamily("embedstream_texts_embedded",
                                            "Texts embedded since the Redis data began",
                                            value=texts))
        families.append(GaugeMetricFamily("embedstream_texts_per_second",
                                          "Texts embedded per second since the previous scrape",
                                          value=self._rate(texts)))
        counters, histograms = await read_metrics(redis, keys)
        for name, help_text in COUNTER_HELP.items():
            families.append(CounterMetricFamily(f"embedstream_{name}", help_text,
                                                value=counters.get(name, 0.0)))
        for name, extra in counters.items():
            if name not in COUNTER_HELP:  # recorded by a newer worker: still shown
                families.append(CounterMetricFamily(f"embedstream_{name}", name, value=extra))
        for name, help_text in HISTOGRAM_HELP.items():
            families.append(_histogram(f"embedstream_{name}", help_text, histograms[name]))
        self.snapshot.families = families

    def _rate(self, texts: float) -> float:
        now = time.monotonic()
        rate = 0.0
        if self._last_rate is not None and now > self._last_rate[0]:
            rate = max(0.0, (texts - self._last_rate[1]) / (now - self._last_rate[0]))
        self._last_rate = (now, texts)
        return round(rate, 1)


def _histogram(name: str, help_text: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [(repr(float(bound)), value) for bound, value in histogram.buckets]
    buckets.append(("+Inf", histogram.count))
    return HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=histogram.sum)


async def _queue_families(redis: RedisClient, keys: Keys,
                          partitions: Partitions) -> list[Metric]:
    waiting = GaugeMetricFamily("embedstream_queue_waiting_chunks",
                                "Chunks not yet delivered to any worker",
                                labels=["model", "lane"])
    running = GaugeMetricFamily("embedstream_queue_running_chunks",
                                "Chunks delivered to a worker and not yet acked",
                                labels=["model", "lane"])
    lag = GaugeMetricFamily("embedstream_queue_lag_seconds",
                            "Age of the oldest chunk not yet delivered (0 when none waits)",
                            labels=["model", "lane"])
    found = await lanes(redis, keys, partitions)
    for lane in found:
        waiting.add_metric([lane.model, lane.lane], lane.waiting)
        running.add_metric([lane.model, lane.lane], lane.running)
        lag.add_metric([lane.model, lane.lane], lane.lag_s)
    return [waiting, running, lag,
            GaugeMetricFamily("embedstream_queued_chunks", "Chunks waiting, all lanes",
                              value=sum(x.waiting for x in found)),
            GaugeMetricFamily("embedstream_running_chunks", "Chunks being embedded, all lanes",
                              value=sum(x.running for x in found))]


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    if not may_scrape(request.scope):
        return error_response(403, "forbidden", "/metrics is for admin keys and the "
                              "EMBEDSTREAM_METRICS_TOKEN only")
    state: PrometheusRegistry = request.app.state.metrics
    pipeline = pipeline_of(request)
    with redis_outage():
        await state.refresh(pipeline.redis, pipeline.keys, pipeline.partitions)
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


class RequestMetrics:
    """ASGI middleware: counts answered requests by route template, and open SSE streams."""

    def __init__(self, app: ASGIApp, metrics: PrometheusRegistry) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}
        gauge: Any = None

        async def sending(message: Message) -> None:
            nonlocal gauge
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
                stream = SSE_PATHS.get(_route(scope))
                if stream is not None and status["code"] == 200:
                    gauge = self.metrics.subscribers.labels(stream)
                    gauge.inc()
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            if gauge is not None:
                gauge.dec()
            self.metrics.requests.labels(*_labels(scope, status["code"])).inc()


def _labels(scope: Scope, code: int) -> tuple[str, str, str]:
    """Route, method and status of a request, each from a finite set."""
    method = scope["method"] if scope["method"] in METHODS else "other"
    status = str(code) if str(code) in STATUSES else "other"
    return _route(scope), method, status


def _route(scope: Scope) -> str:
    """The matched route's template (never the raw path: ids would explode the labels)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
