"""One backend's model alone, fed the way a worker feeds it, beside its own baseline.

No Redis, no server: the first 4,000 unique STS-B sentences, cut into claims
of `batch_max_texts` and each claim into model calls the way a worker does
(`ModelCalls.calls`: length-sorted, by count and padded tokens), run through
the backend's embedder on this thread; against the same embedder on all the
texts sorted by length in batches of 32 (the second table of bench/table.py
calls that the backend's raw embed), and for torch also
`SentenceTransformer.encode` (batch 32). Shows what the call and claim sizes
cost the model before the pipeline costs anything. Then requests: 120 of
32 random sentences each, as the fast lane embeds them, in calls of the
full budgets and of half (`REQUEST_CUT`), where nothing sorts a request's
texts with any others. The shapes run in turn in each of `--rounds` rounds;
prints each shape's texts/s and its ratio to the baseline of the same
round, then the median ratio. Asserts nothing.

    .venv/bin/python bench/call_sizes.py [--backend onnx-int8] [--texts 4000] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from table import EXPORTS, sentences  # noqa: E402

from pipeline.model.info import bundled_model_dir  # noqa: E402
from pipeline.model.loading import load_embedder  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from workers.model_calls import REQUEST_CUT, ModelCalls  # noqa: E402

# (claim texts, call texts, call tokens): the worker's default claims with calls of
# 16 and of 32 texts, and longer sorts.
SHAPES = [(128, 16, 1024), (128, 32, 2048), (256, 32, 2048), (512, 32, 2048)]


def rate(texts: Sequence[str], groups: Sequence[Sequence[str]],
         embed: Callable[[Sequence[str]], object]) -> float:
    started = time.perf_counter()
    for group in groups:
        embed(group)
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="onnx-int8")
    parser.add_argument("--texts", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    pool = sentences()
    texts, warm = pool[:args.texts], pool[4000:4500]
    settings = Settings(backend=args.backend, device="cpu", model=str(bundled_model_dir()),
                        export_dir=EXPORTS)
    embedder = load_embedder(settings)
    ordered = sorted(texts, key=len)
    baseline = [ordered[i:i + 32] for i in range(0, len(ordered), 32)]
    shapes = {}
    for claim, call_texts, call_tokens in SHAPES:
        calls = ModelCalls(embedder, None, max_texts=call_texts, max_tokens=call_tokens)
        shapes[f"claims of {claim}, calls of {call_texts} texts / {call_tokens} tokens"] = [
            group for i in range(0, len(texts), claim) for group in calls.calls(texts[i:i + claim])]
    chooser = random.Random(2)
    requests = [chooser.sample(pool[:8000], 32) for _ in range(120)]
    for cut in (1, REQUEST_CUT):
        calls = ModelCalls(embedder, None, max_texts=32 // cut, max_tokens=2048 // cut)
        shapes[f"32-text requests, calls of {32 // cut} texts / {2048 // cut} tokens"] = [
            group for request in requests for group in calls.calls(request)]
    encode = None
    if args.backend == "torch":
        from sentence_transformers import SentenceTransformer
        raw = SentenceTransformer(str(bundled_model_dir()), device="cpu")
        raw.encode(warm, batch_size=32)
        encode = raw
    embedder.embed(warm[:64])
    rate(warm, [warm[i:i + 32] for i in range(0, len(warm), 32)], embedder.embed)
    ratios: dict[str, list[float]] = {name: [] for name in shapes}
    for number in range(args.rounds):
        own = rate(texts, baseline, embedder.embed)
        line = f"round {number + 1}: {args.backend} embed, all sorted, batches of 32: {own:.0f}"
        if encode is not None:
            started = time.perf_counter()
            encode.encode(texts, batch_size=32)
            line += f"; encode() {len(texts) / (time.perf_counter() - started):.0f}"
        print(line + " texts/s", flush=True)
        for name, groups in shapes.items():
            measured = rate(texts, groups, embedder.embed) * sum(map(len, groups)) / len(texts)
            ratios[name].append(measured / own)
            print(f"  {name}: {measured:.0f} texts/s, {measured / own:.2f} of the baseline",
                  flush=True)
    print(f"median of {args.rounds} rounds, {args.backend}, ratio to the baseline of its round:")
    for name, values in ratios.items():
        print(f"  {name}: {statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")


if __name__ == "__main__":
    main()
