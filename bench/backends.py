"""The graph backends against raw sentence-transformers, speed and fidelity, in one run.

2,000 STS-B train sentences sorted by length, batches of 32, through raw
`SentenceTransformer.encode` (the baseline) and each backend's `embed`
(ONNX Runtime fp32 and int8, OpenVINO f32, and bf16 where the CPU has it).
The rounds interleave the backends, so a busy neighbour on a shared machine
slows all of them alike; each figure is the median of the rounds with their
spread. Fidelity: min cosine to torch over the same sentences, and STS-B dev
Spearman (cosine of each pair against the gold score).

    .venv/bin/python bench/backends.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.model.info import bundled_model_dir  # noqa: E402
from pipeline.model.loading import load_embedder  # noqa: E402
from pipeline.model.openvino_backend import cpu_has_bf16  # noqa: E402
from pipeline.settings import Settings  # noqa: E402

STS = ROOT / "tests" / "data" / "stsbenchmark"
TEXTS = 2000
BATCH = 32
Encode = Callable[[Sequence[str]], Any]


def read_sts(name: str) -> list[list[str]]:
    with (STS / name).open(encoding="utf-8") as handle:
        return list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def train_texts() -> list[str]:
    """The first 2,000 distinct train sentences, sorted by length."""
    texts = list(dict.fromkeys(t for row in read_sts("sts-train.csv") for t in row[5:7]))
    return sorted(texts[:TEXTS], key=len)


def encoders(export_dir: Path) -> dict[str, Encode]:
    """Each contender's batch call: raw torch first, then every graph backend."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    found: dict[str, Encode] = {
        "raw encode": lambda texts: model.encode(list(texts), batch_size=BATCH)}
    names = ["onnx", "onnx-int8", "openvino-f32"] + (["openvino-bf16"] if cpu_has_bf16() else [])
    for name in names:
        embedder = load_embedder(Settings(backend=name, device="cpu", export_dir=export_dir))
        found[name] = lambda texts, e=embedder: e.embed(texts).vectors
    return found


def texts_per_s(encode: Encode, texts: list[str]) -> float:
    started = time.perf_counter()
    for start in range(0, len(texts), BATCH):
        encode(texts[start:start + BATCH])
    return len(texts) / (time.perf_counter() - started)


def vectors(encode: Encode, texts: list[str]) -> Any:
    return np.concatenate([encode(texts[s:s + BATCH]) for s in range(0, len(texts), BATCH)])


def cosine(a: Any, b: Any) -> Any:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def spearman(encode: Encode) -> float:
    rows = read_sts("sts-dev.csv")
    gold = [float(r[4]) for r in rows]
    a, b = (vectors(encode, [r[i] for r in rows]) for i in (5, 6))
    return float(spearmanr(cosine(a, b), gold).statistic)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    texts = train_texts()
    with tempfile.TemporaryDirectory() as tmp:
        contenders = encoders(Path(tmp))
        for encode in contenders.values():
            encode(texts[:BATCH])  # warm up: first-call allocation and compilation
        speeds: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(rounds):
            for name, encode in contenders.items():
                speeds[name].append(texts_per_s(encode, texts))
        reference = vectors(contenders["raw encode"], texts)
        baseline = statistics.median(speeds["raw encode"])
        onnx = statistics.median(speeds["onnx"])
        print(f"{len(texts)} STS-B train sentences sorted by length, batches of {BATCH}, "
              f"{rounds} rounds, {os.cpu_count()} cores\n")
        print("| backend | texts/s (median, spread) | / raw encode | / onnx fp32 "
              "| min cosine to torch | STS-B dev Spearman x 100 |")
        print("|---|---|---|---|---|---|")
        for name, encode in contenders.items():
            median = statistics.median(speeds[name])
            low, high = min(speeds[name]), max(speeds[name])
            low_cos = float(cosine(vectors(encode, texts), reference).min())
            print(f"| `{name}` | {median:.0f} ({low:.0f}-{high:.0f}) | {median / baseline:.2f} "
                  f"| {median / onnx:.2f} | {low_cos:.6f} | {100 * spearman(encode):.2f} |")


if __name__ == "__main__":
    main()
