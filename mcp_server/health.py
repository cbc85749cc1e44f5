"""Probes and metrics: /healthz (alive), /readyz (Redis and a worker), /metrics.

Metrics are read from Redis at scrape time into a registry of this app's
own, so every server replica reports the pipeline's numbers, not its own
share of them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mcp_server.jobs import json_response
from mcp_server.payloads import pipeline_of
from pipeline.stats import StatsSampler


async def healthz(request: Request) -> Response:
    """The process is alive."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 when Redis answers and at least one worker is alive, else 503."""
    try:
        state = await pipeline_of(request).ready()
    except (RedisError, OSError) as exc:
        return json_response({"status": "unavailable", "redis": False, "workers": 0,
                              "error": f"Redis unreachable: {exc}"}, 503)
    ready = state["workers"] > 0
    return json_response({"status": "ready" if ready else "no_workers", **state},
                         200 if ready else 503)


class _TextsCounter:
    """A counter whose value is read from Redis, not counted in this process."""

    def __init__(self) -> None:
        self.value = 0.0

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("embedstream_texts_embedded",
                                  "Texts embedded since the Redis data began", value=self.value)


class Metrics:
    """Prometheus metrics filled from Redis on each scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.texts = _TextsCounter()
        self.registry.register(self.texts)
        self.gauges = {
            "queued_chunks": Gauge("embedstream_queued_chunks", "Chunks waiting in the queue",
                                   registry=self.registry),
            "running_chunks": Gauge("embedstream_running_chunks",
                                    "Chunks claimed by a worker, not yet acked",
                                    registry=self.registry),
            "workers": Gauge("embedstream_workers", "Live workers", registry=self.registry),
            "texts_per_s": Gauge("embedstream_texts_per_second",
                                 "Texts embedded per second since the previous scrape",
                                 registry=self.registry),
        }
        self.sampler: StatsSampler | None = None


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    state: Metrics = request.app.state.metrics
    pipeline = pipeline_of(request)
    if state.sampler is None:
        state.sampler = StatsSampler(pipeline.redis, pipeline.keys)
    stats = await state.sampler.sample()
    state.texts.value = stats.pop("texts_total")
    for name, value in stats.items():
        state.gauges[name].set(value)
    return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
