"""Long inputs: token windows, and pooling the windows' vectors back into one per input.

With `chunk: true`, a text whose tokens (the prompt's and the model's special
tokens included) exceed the model's `max_seq_length` is split into windows.
A window holds `budget = max_seq_length - special tokens - prompt tokens`
word-piece tokens of the text; consecutive windows share `chunk_overlap`
tokens (the stride is `budget - chunk_overlap`), and the last window ends at
the text's last token. A window's text is the span of the original text from
its first token's start to its last token's end (so case and accents
survive), and the model sees `prompt + window`. The input's raw vector is the
mean of its windows' raw vectors weighted by each window's token count (its
text tokens, as counted here); shaping (`dimensions`, `normalize`) comes
after, as for any input.

Deliberate choices, so nobody "fixes" them:

- Windows are cut at token boundaries, not word boundaries. A window that
  starts inside a word ("##ding") may re-tokenize one or two tokens longer;
  the model then truncates that window's tail, which the next window covers
  by the overlap.
- The windows of an input are planned and pooled inside one queue chunk, so
  the chunk's commit stays the unit of exactly-once: an input's vector is
  written once, with all its windows, or not at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.model import tokens
from pipeline.model.prompts import with_prompt

FloatMatrix = np.ndarray[Any, np.dtype[np.float32]]
IntVector = np.ndarray[Any, np.dtype[np.int64]]


@dataclass(frozen=True)
class Plan:
    """What the model embeds for a chunk's inputs: one text each, or its windows."""

    texts: list[str]
    sizes: list[int]
    weights: np.ndarray[Any, np.dtype[np.float64]]
    chunked: bool = False

    @property
    def starts(self) -> list[int]:
        """Position in `texts` of each input's first window."""
        return [0, *np.cumsum(self.sizes)[:-1].tolist()] if self.sizes else []

    def part(self, index: int) -> Plan:
        """The plan of one input alone."""
        start, size = self.starts[index], self.sizes[index]
        return Plan(self.texts[start:start + size], [size],
                    self.weights[start:start + size], self.chunked)

    def pool(
        self, vectors: FloatMatrix, counts: IntVector
    ) -> tuple[FloatMatrix, IntVector, IntVector]:
        """(one raw vector per input, its tokens in all, tokens that count for truncation).

        A chunked input is never truncated (its windows cover every token), so
        its truncation count is 0.
        """
        counts = np.asarray(counts, dtype=np.int64)
        if not self.chunked:
            return vectors, counts, counts
        starts = self.starts
        weighted = np.add.reduceat(vectors.astype(np.float64) * self.weights[:, None], starts)
        totals = np.add.reduceat(self.weights, starts)
        pooled = (weighted / totals[:, None]).astype(np.float32)
        return pooled, np.add.reduceat(counts, starts), np.zeros(len(starts), dtype=np.int64)


def plan_texts(
    texts: list[str], prompt: str, *, chunk: bool, overlap: int, model: str, max_seq_length: int
) -> Plan:
    """The plan for a chunk's texts: prompted, and split into windows when asked and needed."""
    if not chunk:
        return Plan(with_prompt(prompt, texts), [1] * len(texts), np.ones(len(texts)))
    tokenizer = tokens.tokenizer(model)
    specials = len(tokenizer.encode("", add_special_tokens=True).ids)
    prompt_tokens = len(tokenizer.encode(prompt, add_special_tokens=False).ids) if prompt else 0
    budget = max(1, max_seq_length - specials - prompt_tokens)
    model_texts: list[str] = []
    sizes: list[int] = []
    weights: list[int] = []
    for text, encoding in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False),
                              strict=True):
        windows = split_windows(text, encoding.offsets, budget, overlap)
        model_texts.extend(prompt + window for window, _ in windows)
        weights.extend(weight for _, weight in windows)
        sizes.append(len(windows))
    return Plan(model_texts, sizes, np.asarray(weights, dtype=np.float64), chunked=True)


def split_windows(
    text: str, offsets: list[tuple[int, int]], budget: int, overlap: int
) -> list[tuple[str, int]]:
    """(window text, its token count) for each window of `text` (one when it fits)."""
    n = len(offsets)
    if n <= budget:
        return [(text, max(n, 1))]
    stride = max(1, budget - overlap)
    windows: list[tuple[str, int]] = []
    start = 0
    while True:
        end = min(start + budget, n)
        windows.append((text[offsets[start][0]:offsets[end - 1][1]], end - start))
        if end == n:
            return windows
        start += stride
