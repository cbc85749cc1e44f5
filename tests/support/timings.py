"""Short timings for in-process workers, so recovery happens within a second or two."""

from __future__ import annotations

from pipeline.settings import Settings


def quick(settings: Settings) -> Settings:
    """Short timings and small chunks, so recovery happens within a second or two."""
    return settings.replace(heartbeat_interval_s=0.2, heartbeat_ttl_s=1.0,
                            visibility_timeout_s=1.0, block_ms=100, chunk_size=4,
                            fast_lane_max_texts=4, batch_max_texts=8)
