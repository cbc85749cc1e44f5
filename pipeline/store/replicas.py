"""Writes that count only once a replica has them (Redis WAIT).

Replication is asynchronous: a primary answers a write before its replicas
have it, and a primary that dies in between takes the write with it while
its replica takes over. A worker's commit and the XACK of its queue entries
live on different nodes of a cluster, so the ack could survive a commit
that did not, and the chunk would never be redone; a client told 202 could
find no job. So, whenever the deployment has replicas
(`EMBEDSTREAM_WAIT_REPLICAS` -1, the default: one replica) or as many as
configured (n > 0):

- a worker sends `WAIT` after its commit scripts, in the same pipeline and
  so on the same connection, which is what WAIT measures; a node whose
  replicas did not confirm in `EMBEDSTREAM_WAIT_TIMEOUT_MS` is asked again
  with a barrier (below) for as long again; entries still not confirmed are
  not acked: they are delivered again, find their chunk committed, and are
  acked once a replica has it (`queue_waits`, `confirmed`, `settle`);
- a submission and an `Idempotency-Key` binding, whose writes came over
  several connections, end with a barrier on each node they wrote to: a
  small write on a key of that node's slot, then WAIT on that connection,
  which covers every earlier write to the node (`barrier`). Unconfirmed, the
  client gets 503 and retries (its Idempotency-Key, if it sent one, finds the
  job).

A deployment has replicas (for -1) once this process has seen a replica
connected to any primary, or the deployment names one that is down: the
sentinels' list of the primary's replicas, a cluster node flagged as a
replica. It stays so when a primary is left with none: a replica promoted
after a failover has none until the old primary rejoins, and a write it
answered then is on no other node. If the old primary came back stale, or
the promoted node failed in turn, that write would be gone, so until a
replica is back its writes are not acked and its submissions answer 503
(the WAIT finds no replica); the results of those commits are written all
the same, so jobs go on. A deployment whose replicas are gone for good
turns the wait off (`EMBEDSTREAM_WAIT_REPLICAS=0`) or drops them from its
sentinels (`SENTINEL RESET`).

Until one is found, replicas are looked for (`INFO replication`, `CLUSTER
NODES`, `SENTINEL MASTER`) at most every `REFRESH_S`: a deployment without
replicas sends no WAIT and pays nothing.
`EMBEDSTREAM_WAIT_REPLICAS=0` turns waiting off. Without replicas, an
acknowledged write is as safe as the primary's persistence (`appendfsync
everysec` for the embedded server: up to a second of writes lost on a power
cut, none on a process crash).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import Unavailable
from pipeline.store import sentinel
from pipeline.store.connections import is_cluster

if TYPE_CHECKING:
    from pipeline.keys import Keys
    from pipeline.settings import Settings
    from pipeline.store.connections import RedisClient

logger = logging.getLogger(__name__)

REFRESH_S = 5.0
SINGLE = ""  # the one node of a single server
BARRIER_TTL_MS = 60_000


def hash_tag(key: str) -> str:
    """What decides `key`'s cluster slot: its `{tag}`, or the whole key without one."""
    start = key.find("{")
    end = key.find("}", start + 1)
    if start >= 0 and end > start + 1:
        return key[start + 1:end]
    return key


@dataclass(frozen=True)
class Wait:
    """A WAIT queued in a pipeline: the node it went to and the replicas it asked for."""

    node: str
    replicas: int


class Replicas:
    """Waits for replicas where the deployment has them (see the module docstring)."""

    def __init__(self, redis: RedisClient, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.setting = settings.wait_replicas
        self.timeout_ms = settings.wait_timeout_ms
        self._replicated = False
        self._read_at = float("-inf")

    def node_of(self, key: str) -> str:
        """The name of the node serving `key` (SINGLE on a single server)."""
        if is_cluster(self.redis):
            return str(self.redis.get_node_from_key(key).name)  # type: ignore[attr-defined]
        return SINGLE

    async def wanted(self) -> int:
        """How many replicas a write on any node must reach: 0 means do not wait.

        With -1, one once the deployment has replicas, even on a node with none
        connected now (see the module docstring)."""
        if self.setting >= 0:
            return self.setting
        if not self._replicated and time.monotonic() - self._read_at > REFRESH_S:
            self._replicated = await self._has_replicas()
            self._read_at = time.monotonic()
        return 1 if self._replicated else 0

    async def queue_waits(self, pipe: Any, keys: Iterable[str]) -> list[Wait]:
        """Queue a WAIT in `pipe` for each node of `keys` that has replicas to wait for,
        after the writes already queued (the pipeline sends a node's commands in order
        on one connection)."""
        replicas = await self.wanted()
        if not replicas:
            return []
        waits = []
        for node in dict.fromkeys(self.node_of(key) for key in keys):
            pipe.execute_command("WAIT", replicas, self.timeout_ms, **self._target(node))
            waits.append(Wait(node, replicas))
        return waits

    def _target(self, node: str) -> dict[str, Any]:
        """Routing for a command that must go to `node` (none on a single server)."""
        if not node:
            return {}
        return {"target_nodes": self.redis.get_node(node_name=node)}  # type: ignore[attr-defined]

    def confirmed(self, waits: Sequence[Wait], replies: Sequence[Any]) -> set[str]:
        """The nodes whose WAIT (the last `len(waits)` replies) reached its replicas."""
        answers = replies[len(replies) - len(waits):] if waits else []
        good = set()
        for wait, reached in zip(waits, answers, strict=True):
            if isinstance(reached, int) and reached >= wait.replicas:
                good.add(wait.node)
            else:
                logger.warning("node %s: %s of %d replicas confirmed in %d ms",
                               wait.node or "redis", reached, wait.replicas, self.timeout_ms)
        return good

    async def barrier(self, written: Iterable[str]) -> None:
        """Wait until every write so far to the nodes of the `written` keys is on a
        replica; Unavailable (503) if one is not confirmed in time."""
        written = list(written)
        confirmed = await self.settle(written, self.timeout_ms / 1000)
        if {self.node_of(key) for key in written} - confirmed:
            raise Unavailable("no replica confirmed the write in time "
                              f"(EMBEDSTREAM_WAIT_TIMEOUT_MS={self.timeout_ms}); retry",
                              retry_after_s=1)

    async def settle(self, written: Iterable[str], give_up_s: float) -> set[str]:
        """The nodes of the `written` keys whose writes so far are on a replica (all of
        them where there is no replica to wait for); a node not confirmed is asked
        again until `give_up_s` has passed."""
        deadline = time.monotonic() + give_up_s
        waiting = {self.node_of(key): key for key in written}
        settled: set[str] = set()
        while waiting:
            settled |= await self._barrier(waiting)
            waiting = {node: key for node, key in waiting.items() if node not in settled}
            if time.monotonic() >= deadline:
                break
        return settled

    async def _barrier(self, written: dict[str, str]) -> set[str]:
        """One round of `settle`: a small write on each node, then WAIT on its connection
        (which covers every earlier write to the node, whoever made it)."""
        keys = [self.keys.sync(hash_tag(key)) for key in written.values()]
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.set(key, b"1", px=BARRIER_TTL_MS)
            waits = await self.queue_waits(pipe, keys)
            if not waits:  # nothing to wait for: the barrier writes are never sent
                return set(written)
            replies = await pipe.execute(raise_on_error=False)
        return (set(written) - {wait.node for wait in waits}) | self.confirmed(waits, replies)

    async def _has_replicas(self) -> bool:
        """Whether the deployment has a replica: one connected to a primary, or one it
        names while the replica is down (a sentinel's list, a cluster node's flags)."""
        if is_cluster(self.redis):
            nodes: dict[str, Any] = await self.redis.cluster_nodes()  # type: ignore[attr-defined]
            return any("slave" in fields["flags"] for fields in nodes.values())
        if sentinel.is_sentinel_client(self.redis) and await sentinel.known_replicas(self.redis):
            return True
        info = await self.redis.info("replication")
        return any(key.startswith("slave") and isinstance(value, dict)
                   and value.get("state") == "online" for key, value in info.items())
