"""What the worker tests share: quick settings and a Pipeline on them.

`fast_settings` is `quick(settings)` (tests/support/timings.py); a module that
needs other sizes overrides the fixture, asking for this one and replacing
only what differs, so the difference shows where it is used.
"""

from collections.abc import AsyncIterator

import pytest

from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.timings import quick


@pytest.fixture
def fast_settings(settings: Settings) -> Settings:
    """The test's settings with short timings and small chunks."""
    return quick(settings)


@pytest.fixture
async def pipeline(fast_settings: Settings) -> AsyncIterator[Pipeline]:
    """A Pipeline on the module's `fast_settings`, closed after the test."""
    service = Pipeline(fast_settings)
    try:
        yield service
    finally:
        await service.close()


@pytest.fixture
def janitor_often(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the janitor (dead-worker sweep, trimming) every 0.2 s instead of every 10 s."""
    monkeypatch.setattr("workers.upkeep.JANITOR_EVERY_S", 0.2)
