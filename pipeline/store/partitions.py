"""How many partitions each model's bulk lane has (`EMBEDSTREAM_QUEUE_PARTITIONS`).

Set, it is that number. Left at 0, it is one per primary of a cluster (the
primaries that serve slots, read once from `CLUSTER NODES`) and 1 on a
single server, so every process of one deployment computes the same count;
set it explicitly where the processes could disagree (a cluster being
resized), since a worker reads only the partitions it counts. The streams
themselves are named by `pipeline.keys.QueueLayout`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.store.connections import is_cluster

if TYPE_CHECKING:
    from pipeline.keys import Keys, QueueLayout
    from pipeline.settings import Settings
    from pipeline.store.connections import RedisClient


class Partitions:
    """The queue layout of each model, with the partition count read once."""

    def __init__(self, redis: RedisClient, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.configured = settings.queue_partitions
        self._count: int | None = None

    async def count(self) -> int:
        """Bulk partitions per model."""
        if self._count is None:
            self._count = self.configured or await primaries(self.redis)
        return self._count

    async def layout(self, model: str) -> QueueLayout:
        """The model's fast lane and bulk partitions."""
        return self.keys.layout(model, await self.count())


async def primaries(redis: RedisClient) -> int:
    """The primaries serving slots: 1 on a single server."""
    if not is_cluster(redis):
        return 1
    nodes: dict[str, Any] = await redis.cluster_nodes()  # type: ignore[attr-defined]
    return max(1, sum(1 for fields in nodes.values()
                      if "master" in fields["flags"] and "fail" not in fields["flags"]
                      and fields["slots"]))
