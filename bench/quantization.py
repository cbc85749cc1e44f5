"""What quantized delivery costs in quality: STS-B dev Spearman per encoding.

Embeds the STS-B dev pairs and the calibration corpus with the bundled model
(sentence-transformers directly, as a worker does), quantizes the vectors
with embedstream's own code (`pipeline.jobs.quantize`, the ranges from the shipped
calibration corpus) and scores each pair: cosine for float, float16 (on the
half floats as delivered), int8 and uint8 (on the integers as delivered),
Hamming similarity (minus the number of differing bits) for ubinary. Prints
a Markdown table for the README.

    .venv/bin/python bench/quantization.py
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.jobs.quantize import (  # noqa: E402
    calibration_texts,
    half_floats,
    quantize,
    ranges_from,
)
from pipeline.model.info import bundled_model_dir  # noqa: E402

DEV = ROOT / "tests" / "data" / "stsbenchmark" / "sts-dev.csv"
BYTES = {"float": 4 * 384, "float16": 2 * 384, "int8": 384, "uint8": 384, "ubinary": 384 // 8}


def dev_pairs() -> tuple[list[str], list[str], list[float]]:
    """(sentence1s, sentence2s, gold scores) of STS-B dev."""
    firsts, seconds, gold = [], [], []
    with DEV.open(encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            firsts.append(row[5])
            seconds.append(row[6])
            gold.append(float(row[4]))
    return firsts, seconds, gold


def cosine(a: Any, b: Any) -> Any:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def hamming_similarity(a: Any, b: Any) -> Any:
    # int64 before negating: the bit count is unsigned, and minus an unsigned
    # count wraps to values near 2**64 that float64 cannot tell apart.
    return -np.unpackbits(np.bitwise_xor(a, b), axis=1).sum(axis=1).astype(np.int64)


def main() -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    firsts, seconds, gold = dev_pairs()
    a, b = (model.encode(texts, batch_size=64) for texts in (firsts, seconds))
    ranges = ranges_from(model.encode(list(calibration_texts()), batch_size=64), None, True)
    scores = {
        "float": cosine(a, b),
        "float16": cosine(half_floats(a), half_floats(b)),
        "int8": cosine(quantize(a, "int8", ranges), quantize(b, "int8", ranges)),
        "uint8": cosine(quantize(a, "uint8", ranges), quantize(b, "uint8", ranges)),
        "ubinary": hamming_similarity(quantize(a, "ubinary"), quantize(b, "ubinary")),
    }
    base = float(spearmanr(scores["float"], gold).statistic)
    print(f"STS-B dev, {len(gold)} pairs, all-MiniLM-L6-v2 (384 dimensions)\n")
    print("| encoding | bytes per vector | Spearman x 100 | of float |")
    print("|---|---|---|---|")
    for name, values in scores.items():
        rho = float(spearmanr(values, gold).statistic)
        print(f"| `{name}` | {BYTES[name]} | {100 * rho:.2f} | {100 * rho / base:.1f}% |")


if __name__ == "__main__":
    main()
