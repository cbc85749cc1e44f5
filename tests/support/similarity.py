"""Cosine similarity of matching rows, for tests that compare two backends' vectors."""

from __future__ import annotations

from typing import Any

import numpy as np


def cosines(a: Any, b: Any) -> Any:
    """The cosine of each row of `a` with the same row of `b`."""
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
