"""What the worker tests share: each module says what its `fast_settings` are."""

from collections.abc import AsyncIterator

import pytest

from pipeline.service import Pipeline
from pipeline.settings import Settings


@pytest.fixture
async def pipeline(fast_settings: Settings) -> AsyncIterator[Pipeline]:
    """A Pipeline on the module's `fast_settings`, closed after the test."""
    service = Pipeline(fast_settings)
    try:
        yield service
    finally:
        await service.close()
