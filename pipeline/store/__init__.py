"""Redis: clients, the embedded server, fan-out of streams, the feed, metrics and statistics."""


from pipeline.store import feed, metrics
from pipeline.store.commands import AutoClaim, ConsumerInfo
from pipeline.store.connections import RedisClient, connect, redis_outage, text_of
from pipeline.store.embedded import find_running, redis_for
from pipeline.store.fanout import SubscriberDropped
from pipeline.store.metrics import Histogram, read_metrics
from pipeline.store.partitions import Partitions
from pipeline.store.replicas import Replicas
from pipeline.store.stats import lanes, live_workers

__all__ = [
    "AutoClaim",
    "ConsumerInfo",
    "Histogram",
    "Partitions",
    "RedisClient",
    "Replicas",
    "SubscriberDropped",
    "connect",
    "feed",
    "find_running",
    "lanes",
    "live_workers",
    "metrics",
    "read_metrics",
    "redis_for",
    "redis_outage",
    "text_of",
]
