"""What goes in must come out: a total-queue check under faults, on a real cluster.

For `NEMESIS_S` seconds (`EMBEDSTREAM_NEMESIS_S`, 180 by default) client
threads submit jobs (each with an Idempotency-Key, retried until a server
answers 202) and read each one over SSE (resuming with Last-Event-ID,
from whichever server answers), while a nemesis on a fixed seed kills
workers and servers with SIGKILL and starts them again, pauses them with
SIGSTOP/SIGCONT, and kills cluster primaries, which come back as replicas.
Then the faults stop, and every acknowledged job must end.

It runs on the session's cluster of three primaries with a replica each;
with `EMBEDSTREAM_NEMESIS_ON=sentinel`, on a primary, a replica and three
sentinels instead (a killed primary is replaced by the sentinels and comes
back as a replica), which is not part of `make test` (`make
test-nemesis-sentinel` runs it).

The checker counts submitted (jobs a client tried), acknowledged (202),
delivered (every index came over SSE), lost (an acknowledged job, or an
index of one, that never came, or is missing from its results), duplicated
(an index that came twice on one job's stream) and stuck (an acknowledged
job that did not end); all but the first three must be 0.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest

from pipeline.store.server_files import find_server_binary
from tests.support.cluster import ValkeyCluster
from tests.support.processes import Process, start_server, start_worker, wait_for_workers
from tests.support.sentinel import ValkeySentinel
from tests.support.sse_client import Reader, results_pages

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NEMESIS_S = float(os.environ.get("EMBEDSTREAM_NEMESIS_S", "180"))
ON = os.environ.get("EMBEDSTREAM_NEMESIS_ON", "cluster")
SEED = 20261205
CLIENTS = 3
WORKER_ENV = {"EMBEDSTREAM_BACKEND": "tests.support.fakes:SlowEmbedder",
              "EMBEDSTREAM_FAKE_DELAY_S": "0.02", "EMBEDSTREAM_BLOCK_MS": "500",
              "EMBEDSTREAM_CALIBRATE": "0", "EMBEDSTREAM_VISIBILITY_TIMEOUT_S": "4",
              "EMBEDSTREAM_HEARTBEAT_TTL_S": "4", "EMBEDSTREAM_HEARTBEAT_INTERVAL_S": "0.5"}
SERVER_ENV = {"EMBEDSTREAM_IDEMPOTENCY_LEASE_S": "3"}


class Target(Protocol):
    """The Redis deployment under test: where processes connect, how a primary dies."""

    def urls(self) -> list[str]: ...

    def kill_primary(self, rng: random.Random) -> None: ...


@dataclass
class ClusterTarget:
    cluster: ValkeyCluster

    def urls(self) -> list[str]:
        return self.cluster.urls_alive()

    def kill_primary(self, rng: random.Random) -> None:
        cluster = self.cluster
        victim = rng.choice([i for i in cluster.alive() if cluster.role(i) == "master"])
        key = cluster.a_key_of(victim)
        cluster.kill(victim)
        cluster.wait_failover(key, victim)
        cluster.restart(victim)
        cluster.wait_in_sync()


@dataclass
class SentinelTarget:
    deployment: ValkeySentinel

    def urls(self) -> list[str]:
        return [self.deployment.url]

    def kill_primary(self, rng: random.Random) -> None:
        old = self.deployment.kill_primary()
        self.deployment.wait_failover(old)
        self.deployment.restart(old)


@pytest.fixture
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Target]:
    if ON != "sentinel":
        cluster: ValkeyCluster = request.getfixturevalue("ha_cluster")
        cluster.wait_in_sync()
        yield ClusterTarget(cluster)
        return
    with ValkeySentinel(tmp_path_factory.mktemp("sentinel"),
                        find_server_binary("valkey")) as deployment:
        yield SentinelTarget(deployment)


@dataclass
class Fleet:
    """The server and worker processes, replaced as the nemesis kills them."""

    target: Target
    root: Path
    servers: list[tuple[Process, str]] = field(default_factory=list)
    workers: list[Process] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def urls(self) -> list[str]:
        with self.lock:
            return [url for _, url in self.servers]

    def start_server(self) -> None:
        url = random.choice(self.target.urls())
        process, base = start_server(url, self.root, **SERVER_ENV)
        with self.lock:
            self.servers.append((process, base))

    def start_worker(self) -> None:
        url = random.choice(self.target.urls())
        process = start_worker(url, self.root, uuid.uuid4().hex[:6], **WORKER_ENV)
        with self.lock:
            self.workers.append(process)

    def all(self) -> list[Process]:
        with self.lock:
            return [p for p, _ in self.servers] + list(self.workers)


@dataclass
class Ledger:
    """What the clients saw."""

    submitted: int = 0
    acknowledged: dict[str, int] = field(default_factory=dict)  # job id -> texts
    readers: dict[str, Reader] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def client(fleet: Fleet, ledger: Ledger, rng: random.Random, until: float) -> None:
    """Submit jobs until `until`, each retried with its Idempotency-Key until a 202."""
    while time.monotonic() < until:
        texts = [f"nemesis {uuid.uuid4().hex} text {i}" for i in range(rng.randint(20, 300))]
        key = uuid.uuid4().hex
        with ledger.lock:
            ledger.submitted += 1
        job_id = submit_until_accepted(fleet, texts, key, until + 60)
        if job_id is None:
            continue
        reader = Reader(lambda: rng.choice(fleet.urls()), job_id)
        with ledger.lock:
            ledger.acknowledged[job_id] = len(texts)
            ledger.readers[job_id] = reader
        reader.start()
        time.sleep(rng.uniform(0.5, 2.0))


def submit_until_accepted(fleet: Fleet, texts: list[str], key: str,
                          deadline: float) -> str | None:
    while time.monotonic() < deadline:
        try:
            reply = httpx.post(f"{random.choice(fleet.urls())}/v1/jobs", timeout=10,
                               json={"inputs": texts}, headers={"Idempotency-Key": key})
        except httpx.HTTPError:
            reply = None
        if reply is not None and reply.status_code == 202:
            return str(reply.json()["id"])
        time.sleep(0.5)
    return None


def nemesis(fleet: Fleet, rng: random.Random, until: float, log: list[str]) -> None:
    """A fault every few seconds, on a fixed seed, until `until`."""
    faults: list[tuple[str, Callable[[], None]]] = [
        ("kill -9 a worker, start another", lambda: kill_one(fleet, fleet.workers,
                                                             fleet.start_worker, rng)),
        ("kill -9 a server, start another", lambda: kill_one(
            fleet, [p for p, _ in fleet.servers], fleet.start_server, rng)),
        ("pause a worker 6 s", lambda: pause(rng.choice(fleet.workers), 6.0)),
        ("pause a server 3 s", lambda: pause(rng.choice(fleet.servers)[0], 3.0)),
        ("kill -9 a primary, bring it back", lambda: fleet.target.kill_primary(rng)),
    ]
    while time.monotonic() < until:
        time.sleep(rng.uniform(4.0, 8.0))
        name, fault = rng.choice(faults)
        started = time.monotonic()
        fault()
        log.append(f"{name} ({time.monotonic() - started:.1f} s)")


def kill_one(fleet: Fleet, processes: list[Process], start: Callable[[], None],
             rng: random.Random) -> None:
    victim = rng.choice(processes)
    victim.kill()
    with fleet.lock:
        fleet.servers = [(p, u) for p, u in fleet.servers if p is not victim]
        fleet.workers = [p for p in fleet.workers if p is not victim]
    start()


def pause(process: Process, seconds: float) -> None:
    process.popen.send_signal(signal.SIGSTOP)
    time.sleep(seconds)
    process.popen.send_signal(signal.SIGCONT)


def test_what_goes_in_comes_out_under_a_nemesis(target: Target, tmp_path: Path) -> None:
    random.seed(SEED)
    fleet = Fleet(target, tmp_path)
    ledger = Ledger()
    log: list[str] = []
    try:
        for _ in range(2):
            fleet.start_server()
        for _ in range(3):
            fleet.start_worker()
        wait_for_workers(fleet.urls()[0], 3)
        until = time.monotonic() + NEMESIS_S
        threads = [threading.Thread(target=client, daemon=True,
                                    args=(fleet, ledger, random.Random(SEED + i), until))
                   for i in range(CLIENTS)]
        threads.append(threading.Thread(target=nemesis, daemon=True,
                                        args=(fleet, random.Random(SEED), until, log)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=NEMESIS_S + 120)
        outcome = check(fleet, ledger, deadline=time.monotonic() + 180)
        dead = [p.log_path for p in fleet.all() if not p.alive()]
    finally:
        for process in fleet.all():
            process.stop()
    table = "\n".join([f"on {ON}: faults ({len(log)}, seed {SEED}, {NEMESIS_S:.0f} s):",
                       *(f"  {line}" for line in log),
                       *(f"{name:>13}: {value}" for name, value in outcome.items())])
    print("\n" + table)
    assert dead == [], f"a process exited by itself: {dead}"
    assert (outcome["lost"], outcome["duplicated"], outcome["stuck"]) == (0, 0, 0), table
    assert outcome["acknowledged"] > 0 and outcome["delivered"] == outcome["acknowledged"]


def check(fleet: Fleet, ledger: Ledger, deadline: float) -> dict[str, Any]:
    """Wait for every acknowledged job to end (or the deadline), then count."""
    for reader in ledger.readers.values():
        reader.join(timeout=max(0.0, deadline - time.monotonic()))
    for reader in ledger.readers.values():
        reader.stop()
    lost = duplicated = stuck = delivered = 0
    base = fleet.urls()[0]
    for job_id, total in ledger.acknowledged.items():
        reader = ledger.readers[job_id]
        if reader.end is None:
            stuck += 1
            continue
        seen = reader.seen
        duplicated += sum(1 for n in seen.values() if n > 1)
        pages = results_pages(base, job_id)
        missing = (set(range(total)) - set(seen)) | (set(range(total)) - set(pages))
        lost += len(missing)
        delivered += not missing and reader.end["status"] == "completed"
    return {"submitted": ledger.submitted, "acknowledged": len(ledger.acknowledged),
            "delivered": delivered, "lost": lost, "duplicated": duplicated, "stuck": stuck}
