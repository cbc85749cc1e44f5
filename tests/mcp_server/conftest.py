"""Fixtures shared by the MCP server's tests."""

from __future__ import annotations

import pytest

from pipeline.settings import Settings
from tests.support.mcp_tasks import ALICE, BOB


@pytest.fixture
def task_settings(settings: Settings) -> Settings:
    return settings.replace(api_keys=(ALICE, BOB), block_ms=100, chunk_size=2,
                            fast_lane_max_texts=2, heartbeat_interval_s=0.2, heartbeat_ttl_s=2.0)
