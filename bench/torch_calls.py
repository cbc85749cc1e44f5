"""The torch model alone, fed the way a worker feeds it, beside `encode()`.

No Redis, no server: the first 4,000 unique STS-B sentences, cut into claims
of `batch_max_texts` and each claim into model calls the way a worker does
(`ModelCalls.calls`: length-sorted, by count and padded tokens), run through
the torch embedder on this thread; against `SentenceTransformer.encode`
(batch 32, sorted over all the texts). Shows what the call and claim sizes
cost the model before the pipeline costs anything. Two rounds; prints each
shape's texts/s and its ratio to the raw run of the same round. Asserts nothing.

    .venv/bin/python bench/torch_calls.py [--texts 4000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from table import sentences  # noqa: E402

from pipeline.model.info import bundled_model_dir  # noqa: E402
from pipeline.model.torch_backend import SentenceTransformerEmbedder  # noqa: E402
from pipeline.settings import Settings  # noqa: E402
from workers.model_calls import ModelCalls  # noqa: E402

# (claim texts, call texts, call tokens): the default's worker, torch's, and longer sorts.
SHAPES = [(128, 16, 1024), (128, 32, 2048), (256, 32, 2048), (512, 32, 2048)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=4000)
    args = parser.parse_args()
    from sentence_transformers import SentenceTransformer

    pool = sentences()
    texts, warm = pool[:args.texts], pool[4000:4500]
    settings = Settings(backend="torch", device="cpu", model=str(bundled_model_dir()))
    embedder = SentenceTransformerEmbedder(settings)
    raw = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    raw.encode(warm, batch_size=32)
    embedder.embed(warm[:64])
    for round_number in range(2):
        started = time.perf_counter()
        raw.encode(texts, batch_size=32)
        raw_rate = len(texts) / (time.perf_counter() - started)
        print(f"round {round_number + 1}: raw encode {raw_rate:.0f} texts/s", flush=True)
        for claim, call_texts, call_tokens in SHAPES:
            calls = ModelCalls(embedder, None, max_texts=call_texts, max_tokens=call_tokens)
            started = time.perf_counter()
            for i in range(0, len(texts), claim):
                for group in calls.calls(texts[i:i + claim]):
                    embedder.embed(group)
            rate = len(texts) / (time.perf_counter() - started)
            print(f"  claims of {claim}, calls of {call_texts} texts / {call_tokens} tokens: "
                  f"{rate:.0f} texts/s, {rate / raw_rate:.2f} of raw", flush=True)


if __name__ == "__main__":
    main()
