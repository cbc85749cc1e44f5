"""The data files the tests carry: the STS benchmark's train and dev splits.

They live in `tests/data/` so that a plain clone of the repository runs the
whole suite; the test split is reserved and not included.
"""

from __future__ import annotations

from pathlib import Path

STS_DIR = Path(__file__).resolve().parents[1] / "data" / "stsbenchmark"
STS_DEV = STS_DIR / "sts-dev.csv"
STS_TRAIN = STS_DIR / "sts-train.csv"
