"""One Settings object, read once from the environment and passed down explicitly.

Every field maps to an `EMBEDSTREAM_<NAME>` variable; the CLI turns flags into
overrides of the same fields, so a flag and a variable can never disagree.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PREFIX = "EMBEDSTREAM_"


@dataclass(frozen=True)
class Settings:
    """Configuration shared by the server, the workers and the CLI."""

    redis_url: str | None = None
    data_dir: Path = Path(".embedstream")
    model: str = "all-MiniLM-L6-v2"
    backend: str = "auto"
    device: str = "auto"
    # torch precision on a GPU: "float16" is opt-in.
    dtype: str = "float32"
    # Where ONNX exports are cached; None: <data_dir>/onnx.
    export_dir: Path | None = None
    # The shared embedding cache in Redis (EMBEDSTREAM_CACHE=off disables it).
    cache: bool = True
    cache_ttl_s: int = 7 * 24 * 3600
    cache_max_entries: int = 200_000
    # Whose texts a cached vector answers: "tenant" (one key's cache never answers another),
    # "global" (shared), "auto": tenant when API keys are set, else global.
    cache_scope: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    # Keys that see and manage every tenant's jobs (they are valid API keys too).
    admin_keys: tuple[str, ...] = ()
    # Dashboard sign-in sessions (a random id in Redis) last this long.
    session_ttl_s: int = 12 * 3600
    # A bearer token that reads /metrics beyond admin keys (for a scraper); unset: admins only.
    metrics_token: str = ""
    # Proxies whose X-Forwarded-Proto/-For are believed (addresses or CIDRs; "*" any).
    trusted_proxies: tuple[str, ...] = ()
    # Per-key quotas, with API keys set (0: none): texts waiting in a key's unfinished jobs,
    # its unfinished jobs, its interactive requests in flight, its dashboard sessions.
    key_quota_texts: int = 0
    key_quota_jobs: int = 1000
    key_quota_requests: int = 64
    key_quota_sessions: int = 32
    # The HTTP server: connections at once (past it, 503), idle keep-alive, and how long a
    # client may take to send a request's headers.
    http_max_connections: int = 4096
    http_keepalive_s: float = 5.0
    http_header_timeout_s: float = 10.0
    url: str = "http://127.0.0.1:8000"
    insecure: bool = False
    # Allowed Host header values for the MCP transports beyond loopback ("*" allows any).
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    # Origins allowed to read responses cross-site (CORS); unset: CORS off.
    cors_origins: tuple[str, ...] = ()

    key_prefix: str = "es"
    # Streams per lane of a model, each on its own hash slot; 0: one per cluster primary
    # (1 on a single server).
    queue_partitions: int = 0
    # Replicas a commit, a submission and a binding must reach before they count (Redis
    # WAIT); -1: one whenever the primary has a replica, 0: never wait.
    wait_replicas: int = -1
    wait_timeout_ms: int = 2_000
    # OpenTelemetry traces: "off", "otlp" (the OTEL_EXPORTER_OTLP_* variables say where;
    # needs the `otlp` extra) or "console".
    tracing: str = "off"
    chunk_size: int = 32
    fast_lane_max_texts: int = 32
    # Longer claims sort more texts by length together; calls of 32 pay the per-call
    # cost half as often as calls of 16. Fed so, the model alone ran at 0.97-1.00 of
    # its own all-sorted baseline against 0.88-0.95 with claims of 128 and calls of 16
    # (onnx-int8, openvino-bf16, onnx; bench/call_sizes.py, 2026-12-06).
    batch_max_texts: int = 256
    # One model call: the fast lane is served between calls, so these bound its wait.
    call_max_texts: int = 32
    call_max_tokens: int = 2048
    max_inputs: int = 1_000_000
    max_text_chars: int = 100_000
    # Bytes of one NDJSON upload (one job) and of a JSON body, counted as they arrive.
    max_upload_bytes: int = 1024 * 1024 * 1024
    max_json_bytes: int = 64 * 1024 * 1024
    # Texts waiting per model past which jobs are refused (429); 0: no limit.
    max_backlog: int = 1_000_000
    # The same for interactive requests (embed, similarity, /v1/embeddings), fast lane only.
    interactive_backlog: int = 20_000
    block_ms: int = 2_000
    visibility_timeout_s: float = 30.0
    max_deliveries: int = 3
    heartbeat_interval_s: float = 5.0
    heartbeat_ttl_s: float = 15.0
    result_ttl_s: int = 7 * 24 * 3600
    stats_interval_s: float = 2.0
    sse_ping_s: float = 15.0
    # Events buffered per SSE subscriber; one that falls this far behind is dropped (it resumes).
    sse_buffer: int = 1024
    # The reconnect delay SSE streams ask browsers for (a random part up to as much is added).
    sse_retry_ms: int = 2000
    feed_maxlen: int = 10_000
    embed_timeout_s: float = 300.0
    # A job that makes no progress for this long ends failed (a job's own timeout_s wins).
    job_timeout_s: float = 3600.0
    # Inputs and the record of a job not yet queued expire this long after their last write.
    staging_ttl_s: int = 120
    # An upload holds its Idempotency-Key this long past its last renewal.
    idempotency_lease_s: float = 5.0
    # How often a server or worker runs the job janitor (timeouts, lost feed events).
    janitor_interval_s: float = 5.0
    embed_max_texts: int = 512
    # Whether `embedstream worker` records its model's int8/uint8 calibration at start.
    calibrate: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `EMBEDSTREAM_*` variables, then apply non-None overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _coerce(f.name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _coerce(name: str, raw: str) -> Any:
    default = {f.name: f for f in dataclasses.fields(Settings)}[name].default
    if name == "redis_url":
        return raw or None
    if name == "export_dir":
        return Path(raw) if raw else None
    if isinstance(default, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, Path):
        return Path(raw)
    if isinstance(default, tuple):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw
