"""The benchmark tables: every figure of issue 18 beside its baseline, each the median of N runs.

Measured from outside, as a user meets it: a server and one worker started
as `embedstream up` starts them (cache on, `OMP_NUM_THREADS` = the cores),
one backend at a time (`auto`, `onnx`, `torch`, `onnx-int8`: the worker under
test is the only one running), each run in on 1,000 texts first. Bulk is one
job over REST read over SSE with base64 vectors; the 1-text and 32-text
`/v1/embeddings` figures are driven by wrk (bench/wrk_embeddings.lua), which
leaves the two cores to the server and the worker. The texts are the first
4,000 unique STS-B sentences the tests carry (`tests/data/stsbenchmark/`).

Baselines run in a child process, with the worker idle, within each run:
raw `SentenceTransformer.encode` (torch, batch 32; the first table's
baseline) and the backend's own `embed` on the same texts sorted by length,
in batches of 32, as bench/backends.py runs it (the second table's). Every
figure is the median of `--runs` runs with its min-max spread, beside the
median of the baselines of the same runs; never the best of. The mark says
whether each run's own ratio met the target: pass (all did), miss (none),
straddle (some). The Redis cache is emptied before every measured run, so no
run is answered from an earlier one. Prints two tables; asserts nothing.

    .venv/bin/python bench/table.py [--texts 4000] [--runs 3] [--seconds 10]
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from backends import cosine, texts_per_s  # noqa: E402

from pipeline import Keys  # noqa: E402
from pipeline.model.info import bundled_model_dir  # noqa: E402
from pipeline.store.embedded import EmbeddedRedis  # noqa: E402
from tests.support.processes import (  # noqa: E402
    Process,
    start_server,
    start_worker,
    wait_for_workers,
    wait_until,
)
from tests.support.sse_client import read_events  # noqa: E402

STS = ROOT / "tests" / "data" / "stsbenchmark"
EXPORTS = ROOT / ".embedstream" / "onnx"
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk_embeddings.lua"
BACKENDS = ("auto", "onnx", "torch", "onnx-int8")
THREADS = str(os.cpu_count() or 1)  # what `embedstream up` gives its one worker
Row = tuple[str, str, str, str, str, str]


def sentences() -> list[str]:
    texts: list[str] = []
    for split in ("train", "dev"):
        with (STS / f"sts-{split}.csv").open(encoding="utf-8") as handle:
            for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
                texts += [row[5], row[6]]
    return list(dict.fromkeys(texts))


def dev_pairs() -> tuple[list[str], list[str], list[float]]:
    first, second, gold = [], [], []
    with (STS / "sts-dev.csv").open(encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            first.append(row[5])
            second.append(row[6])
            gold.append(float(row[4]))
    return first, second, gold


def warm_up_texts() -> list[str]:
    """1,000 sentences of the same kind that no measurement uses (after the 4,000)."""
    return sentences()[4000:5000]


def probe_texts() -> list[str]:
    """40 one-text queries for the raw model's p50: the last STS-B sentences."""
    return sentences()[-40:]


def dev_spearman(vector_of: dict[str, np.ndarray]) -> float:
    """STS-B dev Spearman of the cosine of each pair, given every dev sentence's vector."""
    from scipy.stats import spearmanr

    first, second, gold = dev_pairs()
    a = np.stack([vector_of[t] for t in first])
    b = np.stack([vector_of[t] for t in second])
    return float(spearmanr(cosine(a, b), gold).statistic)


def dev_sentences() -> list[str]:
    first, second, _ = dev_pairs()
    return list(dict.fromkeys(first + second))


class Raw:
    """The bare models, every baseline, in a child process of its own.

    Not in this process: with torch and the model loaded here, the HTTP
    clients that load the server ran 30-40% slower (more objects for every
    garbage collection to walk, torch's threads). The child waits on its
    stdin while the pipeline is measured, so it costs nothing then.
    """

    def __init__(self, count: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": THREADS}
        self.child = subprocess.Popen(
            [sys.executable, __file__, "--raw-child", str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        # Loaded and run in before any worker starts: torch's run-in beside a worker's
        # first start once took the backends' measurement (the `auto` verdict) to a tenth.
        self.ask("ready")

    def ask(self, op: str, arg: str = "") -> Any:
        """One question (see `raw_child`), one JSON answer."""
        assert self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write(f"{op} {arg}\n")
        self.child.stdin.flush()
        while True:  # a runtime may print to stdout too: only "answer " lines are ours
            line = self.child.stdout.readline()
            if not line:
                raise RuntimeError(f"the raw child exited while answering {op!r}")
            if line.startswith("answer "):
                return json.loads(line.removeprefix("answer "))

    def close(self) -> None:
        self.child.kill()
        self.child.wait()


def raw_child(count: int) -> None:
    """Answer on stdin: `ready` (once loaded and run in), `encode` (torch texts/s),
    `embed NAME` (a backend's texts/s),
    `p50` (torch 1-text ms), `vectors PATH` (torch's, saved), `spearman` (torch's)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    model.encode(warm_up_texts(), batch_size=32)
    texts = sentences()[:count]
    by_length = sorted(texts, key=len)
    embedders: dict[str, Any] = {}
    for line in sys.stdin:
        op, _, arg = line.strip().partition(" ")
        if op == "ready":
            answer: Any = True
        elif op == "encode":
            started = time.perf_counter()
            model.encode(texts, batch_size=32)
            answer = len(texts) / (time.perf_counter() - started)
        elif op == "embed":
            embedder = embedders.get(arg) or embedders.setdefault(arg, run_in(arg))
            answer = texts_per_s(lambda batch, e=embedder: e.embed(batch).vectors, by_length)
        elif op == "p50":
            answer = one_text_p50_ms(model)
        elif op == "vectors":
            np.save(arg, model.encode(texts, batch_size=32))
            answer = arg
        else:
            dev = dev_sentences()
            answer = dev_spearman(dict(zip(dev, model.encode(dev, batch_size=32), strict=True)))
        print("answer " + json.dumps(answer), flush=True)


def run_in(backend: str) -> Any:
    """A backend's embedder, as a worker loads it, after the same 1,000-text run-in."""
    from pipeline.model.loading import load_embedder
    from pipeline.settings import Settings

    embedder = load_embedder(Settings(backend=backend, device="cpu", export_dir=EXPORTS))
    texts = sorted(warm_up_texts(), key=len)
    for start in range(0, len(texts), 32):
        embedder.embed(texts[start:start + 32])
    return embedder


def one_text_p50_ms(model: Any) -> float:
    times = []
    for text in probe_texts():
        started = time.perf_counter()
        model.encode([text])
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


@dataclass
class Series:
    """One figure's value in each run."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def show(self, unit: str, fmt: str = ".0f") -> str:
        low, high = min(self.values), max(self.values)
        spread = f" ({low:{fmt}}-{high:{fmt}})" if len(self.values) > 1 else ""
        return f"{self.median:{fmt}} {unit}{spread}"


@dataclass(frozen=True)
class Target:
    """A bound a figure should meet: `>= bound` or `<= bound`."""

    op: str
    bound: float
    unit: str = ""

    def mark(self, values: list[float], fmt: str = ".2f") -> str:
        """pass, miss or straddle over the runs, with the runs' range."""
        hits = sum(v >= self.bound if self.op == ">=" else v <= self.bound for v in values)
        verdict = "pass" if hits == len(values) else "miss" if hits == 0 else "straddle"
        if len(values) == 1:
            return verdict
        return f"{verdict} ({min(values):{fmt}} to {max(values):{fmt}})"

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}{self.unit}"


def ratio_row(name: str, measured: Series, baseline: Series, target: Target,
              unit: str = "texts/s", fmt: str = ".0f") -> Row:
    per_run = [m / b for m, b in zip(measured.values, baseline.values, strict=True)]
    return (name, measured.show(unit, fmt), baseline.show(unit, fmt),
            f"{measured.median / baseline.median:.2f}", str(target), target.mark(per_run))


def difference_row(name: str, measured: Series, baseline: Series, target: Target) -> Row:
    per_run = [m - b for m, b in zip(measured.values, baseline.values, strict=True)]
    return (name, measured.show("ms", ".1f"), baseline.show("ms", ".1f"),
            f"{measured.median - baseline.median:+.1f} ms", str(target),
            target.mark(per_run, "+.1f"))


@dataclass
class Phase:
    """What one backend's runs measured, figure by figure."""

    backend: str
    series: dict[str, Series] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.series.setdefault(name, Series()).values.append(value)

    def __getitem__(self, name: str) -> Series:
        return self.series[name]


@dataclass(frozen=True)
class Wrk:
    """One wrk run: texts/s and latency percentiles."""

    texts_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int


def wrk(base: str, texts_file: Path, per_request: int, connections: int, seconds: int) -> Wrk:
    """Drive POST /v1/embeddings with wrk (one thread), each request new texts."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "60s",
         "-s", str(WRK_SCRIPT), f"{base}/v1/embeddings", "--", str(texts_file),
         str(per_request)], capture_output=True, text=True, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("wrk-result "))
    result = json.loads(line.removeprefix("wrk-result "))
    if result["errors"]:
        print(f"warning: {result['errors']} wrk requests failed", file=sys.stderr)
    return Wrk(result["requests"] * per_request / result["seconds"], result["p50_ms"],
               result["p99_ms"], result["requests"])


def write_wrk_texts(path: Path) -> Path:
    """The texts wrk sends, one JSON-escaped a line: sentences no other figure uses."""
    lines = [orjson.dumps(t).decode()[1:-1] for t in sentences()[5000:-40]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def bulk(base: str, texts: list[str]) -> tuple[float, np.ndarray]:
    """Seconds from POST /v1/jobs to the last result read over SSE (base64), and the vectors."""
    started = time.perf_counter()
    reply = httpx.post(f"{base}/v1/jobs", json={"inputs": texts}, timeout=120)
    reply.raise_for_status()
    encoded: dict[int, str] = {}
    with httpx.stream("GET", f"{base}/v1/jobs/{reply.json()['id']}/events",
                      params={"encoding": "base64"},
                      timeout=httpx.Timeout(10, read=900)) as response:
        for event in read_events(response):
            if event.event == "result":
                encoded.update((item["index"], item["embedding"]) for item in event.data)
    seconds = time.perf_counter() - started
    if len(encoded) != len(texts):
        print(f"warning: got {len(encoded)} of {len(texts)} results", file=sys.stderr)
    vectors = [np.frombuffer(base64.b64decode(encoded[i]), "<f4") for i in sorted(encoded)]
    return seconds, np.stack(vectors)


def with_subscribers(base: str, texts: list[str], subscribers: int) -> float:
    """Bulk seconds with `subscribers` connections reading /v1/events.

    The subscribers are plain sockets drained by one thread (they read every
    byte the server sends, so back-pressure is as real as a browser's): 100
    httpx streams in threads spent over 4 s of CPU on these two cores
    during one job, which measured the client, not the fan-out. They are
    connected, and past the feed's replay, before the timed job starts.
    """
    where = urlsplit(base)
    host, port = where.hostname or "127.0.0.1", where.port or 80
    request = (f"GET /v1/events HTTP/1.1\r\nHost: {host}:{port}\r\n"
               "Accept: text/event-stream\r\n\r\n").encode()
    sockets = [socket.create_connection((host, port), timeout=10) for _ in range(subscribers)]
    stop = threading.Event()
    last_read = [0.0]  # when a subscriber last got bytes; 0: none yet
    selector = selectors.DefaultSelector()
    for sock in sockets:
        sock.sendall(request)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)

    def drain() -> None:
        while not stop.is_set():
            for key, _ in selector.select(timeout=0.1):
                if key.fileobj.recv(1 << 16):  # type: ignore[union-attr]
                    last_read[0] = time.monotonic()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        wait_until(lambda: 0 < last_read[0] < time.monotonic() - 0.5, 60, "the feed's replay")
        return bulk(base, texts)[0]
    finally:
        stop.set()
        reader.join()
        for sock in sockets:
            sock.close()


def rss_mb(pid: int) -> float:
    """Peak resident memory of a process (VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int) -> float:
    """CPU seconds (user and system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bench:
    """The running pieces (Redis, the server, the raw child) and the measurements on them."""

    def __init__(self, args: argparse.Namespace, raw: Raw, root: Path, redis_url: str,
                 server: Process, base: str) -> None:
        self.args, self.raw, self.root = args, raw, root
        self.redis_url, self.server, self.base = redis_url, server, base
        self.store = redis.Redis.from_url(redis_url)
        self.texts = sentences()[:args.texts]
        self.wrk_texts = write_wrk_texts(root / "wrk-texts.txt")

    def empty_cache(self) -> None:
        """Delete every cache entry, so a run embeds its texts rather than reading them."""
        keys = list(self.store.scan_iter(match=f"{Keys().prefix}:cache:*", count=1000))
        for start in range(0, len(keys), 1000):
            self.store.delete(*keys[start:start + 1000])

    @contextmanager
    def worker(self, backend: str) -> Iterator[Process]:
        """One worker as `embedstream up` starts it, run in, then stopped and gone."""
        proc = start_worker(self.redis_url, self.root, backend, EMBEDSTREAM_BACKEND=backend,
                            EMBEDSTREAM_EXPORT_DIR=str(EXPORTS), OMP_NUM_THREADS=THREADS)
        try:
            wait_for_workers(self.base, 1, timeout_s=900)
            calibration = Keys().calibration("all-MiniLM-L6-v2")
            wait_until(lambda: bool(self.store.exists(calibration)), 300, "the calibration")
            bulk(self.base, warm_up_texts())
            yield proc
        finally:
            proc.stop()
            wait_until(lambda: httpx.get(f"{self.base}/readyz", timeout=5)
                       .json().get("workers", 0) == 0, 60, "the worker to deregister")

    def model_backend(self) -> tuple[str, str]:
        """The backend the worker runs, and why (GET /v1/models)."""
        model = httpx.get(f"{self.base}/v1/models", timeout=10).json()["data"][0]
        return str(model["backend"]), str(model.get("backend_reason") or "")

    def pipeline_spearman(self) -> float:
        """STS-B dev Spearman of the vectors the pipeline delivers."""
        dev = dev_sentences()
        return dev_spearman(dict(zip(dev, bulk(self.base, dev)[1], strict=True)))

    def phase(self, backend: str) -> Phase:
        """Every run of one backend, its baselines beside each."""
        phase = Phase(backend)
        with self.worker(backend) as proc:
            chosen, reason = self.model_backend()
            phase.extras.update(backend=chosen, reason=reason)
            if backend in ("auto", "onnx-int8"):
                phase.extras["spearman"] = self.pipeline_spearman()
            for run in range(self.args.runs):
                self.bulk_run(phase, chosen, keep=run == 0)
                if backend == "auto":
                    self.interactive_run(phase)
            phase.extras["rss"] = (rss_mb(self.server.popen.pid), rss_mb(proc.popen.pid))
        return phase

    def bulk_run(self, phase: Phase, backend: str, keep: bool) -> None:
        """Raw encode, the backend's raw embed, then the pipeline, on the same texts."""
        self.empty_cache()
        phase.add("raw", self.raw.ask("encode"))
        phase.add("embed", self.raw.ask("embed", backend))
        seconds, vectors = bulk(self.base, self.texts)
        phase.add("bulk", len(self.texts) / seconds)
        if keep:
            phase.extras["vectors"] = vectors

    def interactive_run(self, phase: Phase) -> None:
        """The /v1/embeddings figures (wrk), the backlog, the cache and the subscribers."""
        seconds = self.args.seconds
        self.empty_cache()
        before = cpu_s(self.server.popen.pid)
        many = wrk(self.base, self.wrk_texts, 1, self.args.clients, seconds)
        phase.add("server cpu", (cpu_s(self.server.popen.pid) - before) * 1000 / many.requests)
        phase.add("clients", many.texts_per_s)
        phase.add("clients p99", many.p99_ms)
        phase.add("clients p50", many.p50_ms)
        self.empty_cache()
        phase.add("batches", wrk(self.base, self.wrk_texts, 32, 4, seconds).texts_per_s)
        self.empty_cache()
        phase.add("p50", wrk(self.base, self.wrk_texts, 1, 1, max(3, seconds // 2)).p50_ms)
        phase.add("raw p50", self.raw.ask("p50"))
        phase.add("backlog p50", self.behind_backlog())
        fresh = [f"cache run: {t}" for t in self.texts]
        self.empty_cache()
        phase.add("first", bulk(self.base, fresh)[0])
        phase.add("again", bulk(self.base, fresh)[0])
        self.empty_cache()
        subscribed = with_subscribers(self.base, self.texts, self.args.subscribers)
        phase.add("subscribed", len(self.texts) / subscribed)

    def behind_backlog(self) -> float:
        """1-text p50 (wrk, one connection) while a backlog job runs (cancelled after)."""
        texts = [f"backlog {i}: {t}" for i, t in enumerate((sentences() * 2)[:self.args.backlog])]
        self.empty_cache()
        job = httpx.post(f"{self.base}/v1/jobs", json={"inputs": texts}, timeout=300).json()
        url = f"{self.base}/v1/jobs/{job['id']}"
        try:
            wait_until(lambda: httpx.get(url, timeout=10).json()["done"] > 0, 120,
                       "the backlog to start")
            return wrk(self.base, self.wrk_texts, 1, 1, 3).p50_ms
        finally:
            httpx.delete(url, timeout=30)


def fidelity_rows(phase: Phase, torch_vectors: np.ndarray, torch_rho: float,
                  within: float) -> list[Row]:
    """Min cosine of the delivered vectors to torch's, and STS-B dev Spearman against torch's."""
    rho = phase.extras["spearman"]
    low = float(cosine(phase.extras["vectors"], torch_vectors).min())
    closeness = Target(">=", 0.9999)
    delta = Target("<=", within)
    return [
        ("  min cosine to torch", f"{low:.6f}", "1", "", str(closeness), closeness.mark([low])),
        ("  |STS-B dev Spearman - torch's|", f"{rho:.4f}", f"{torch_rho:.4f}",
         f"{rho - torch_rho:+.4f}", str(delta), delta.mark([abs(rho - torch_rho)])),
    ]


def first_table(args: argparse.Namespace, phases: dict[str, Phase], torch_vectors: np.ndarray,
                torch_rho: float) -> list[Row]:
    auto, torch, int8 = phases["auto"], phases["torch"], phases["onnx-int8"]
    p99_per_p50 = Series([h / m for h, m in zip(auto["clients p99"].values,
                                                 auto["clients p50"].values, strict=True)])
    server_rss, worker_rss = auto.extras["rss"]
    return [
        ratio_row(f"default (auto: {auto.extras['backend']}) bulk REST->SSE / raw torch encode",
                  auto["bulk"], auto["raw"], Target(">=", 1.5)),
        *fidelity_rows(auto, torch_vectors, torch_rho, 0.001),
        ratio_row("torch backend bulk / raw", torch["bulk"], torch["raw"], Target(">=", 0.9)),
        ratio_row("onnx-int8 bulk / raw", int8["bulk"], int8["raw"], Target(">=", 2.5)),
        *fidelity_rows(int8, torch_vectors, torch_rho, 0.005)[1:],
        ratio_row(f"{args.clients} x 1-text clients (wrk) / raw", auto["clients"], auto["raw"],
                  Target(">=", 0.8)),
        ("  p99 / p50", auto["clients p99"].show("ms", ".1f"),
         auto["clients p50"].show("ms", ".1f"), f"{p99_per_p50.median:.2f}",
         str(Target("<=", 3)), Target("<=", 3).mark(p99_per_p50.values)),
        ("  server CPU per request (parse, auth, queue, reply)",
         auto["server cpu"].show("ms", ".2f"), "", "", "", ""),
        ratio_row("/v1/embeddings, 32 texts a request (wrk, 4 connections) / raw",
                  auto["batches"], auto["raw"], Target(">=", 1.2)),
        difference_row("1-text p50 (wrk, 1 connection) - raw p50", auto["p50"],
                       auto["raw p50"], Target("<=", 2, " ms")),
        ratio_row(f"1-text p50 behind {args.backlog} texts / idle", auto["backlog p50"],
                  auto["p50"], Target("<=", 3), "ms", ".1f"),
        ratio_row(f"same {args.texts} texts again / first", auto["again"], auto["first"],
                  Target("<=", 0.1), "s", ".2f"),
        ratio_row(f"bulk with {args.subscribers} feed subscribers / without",
                  auto["subscribed"], auto["bulk"], Target(">=", 0.9)),
        ("server RSS / worker RSS (peak)", f"{server_rss:.0f} MB", f"{worker_rss:.0f} MB", "",
         "<= 250 MB / <= 1.2 GB", ""),
    ]


def second_table(phases: dict[str, Phase]) -> list[Row]:
    """Each backend through the pipeline against its own embed on the same texts."""
    return [ratio_row(f"{name}: {phase.extras['backend']}" if name == "auto" else name,
                      phase["bulk"], phase["embed"], Target(">=", 0.95))
            for name, phase in phases.items()]


def show(rows: list[Row], header: Row) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
    print()


def measure(args: argparse.Namespace, raw: Raw, root: Path) -> dict[str, Phase]:
    with EmbeddedRedis(root / "redis") as redis_server:
        server, base = start_server(redis_server.url, root)
        try:
            bench = Bench(args, raw, root, redis_server.url, server, base)
            return {backend: bench.phase(backend) for backend in BACKENDS}
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="each wrk throughput run")
    parser.add_argument("--backlog", type=int, default=12000)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--raw-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_child:
        raw_child(args.raw_child)
        return
    load, started = os.getloadavg(), time.monotonic()
    raw = Raw(args.texts)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            phases = measure(args, raw, Path(tmp))
            torch_vectors = np.load(raw.ask("vectors", str(Path(tmp) / "torch.npy")))
            torch_rho = raw.ask("spearman")
    finally:
        raw.close()
    report(args, phases, first_table(args, phases, torch_vectors, torch_rho),
           second_table(phases), (load[0], os.getloadavg()[0], time.monotonic() - started))


def report(args: argparse.Namespace, phases: dict[str, Phase], first: list[Row],
           second: list[Row], context: tuple[float, float, float]) -> None:
    print(f"{args.texts} STS-B sentences, median of {args.runs} runs (min-max), "
          f"{os.cpu_count()} cores, load average {context[0]:.2f} at the start and "
          f"{context[1]:.2f} at the end, {context[2] / 60:.1f} min")
    print(f"{phases['auto'].extras['reason']}\n")
    show(first, ("figure", "measured", "baseline", "ratio", "target", "runs"))
    show(second, ("pipeline bulk / the backend's raw embed", "pipeline", "raw embed", "ratio",
                  "target", "runs"))
    for verdict in ("straddle", "miss"):
        names = [row[0].strip() for row in [*first, *second] if row[5].startswith(verdict)]
        print(f"{verdict}: {'; '.join(names) or 'none'}")


if __name__ == "__main__":
    main()
