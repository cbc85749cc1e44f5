"""The data files the tests carry: the STS benchmark's train and dev splits.

They live in `tests/data/` so that a plain clone of the repository runs the
whole suite; the test split is reserved and not included.
"""

from __future__ import annotations

import csv
from pathlib import Path

STS_DIR = Path(__file__).resolve().parents[1] / "data" / "stsbenchmark"
STS_DEV = STS_DIR / "sts-dev.csv"
STS_TRAIN = STS_DIR / "sts-train.csv"


def dev_texts() -> list[str]:
    """The distinct sentences of the dev split, in file order."""
    texts: list[str] = []
    with STS_DEV.open(encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            texts += [row[5], row[6]]
    return list(dict.fromkeys(texts))
