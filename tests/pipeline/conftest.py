"""Fixtures shared by the pipeline's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where ONNX exports go: `EMBEDSTREAM_EXPORT_DIR` if set (shared), else a new folder."""
    shared = os.environ.get("EMBEDSTREAM_EXPORT_DIR")
    return Path(shared) if shared else tmp_path_factory.mktemp("exports")
