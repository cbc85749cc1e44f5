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

Limits, checked when a chunked job is submitted (`check_windows`, 422): the
prompt may take at most half of a window's room for text (`max_seq_length`
less the special tokens: 127 of MiniLM's 256), so every window carries at
least as much text as prompt; and `chunk_overlap` must leave a stride of at
least a quarter of what a window holds of the text. Past half, a long prompt
soon leaves windows of one token, each the prompt plus a token the model
barely weighs, and an input becomes thousands of model calls. An input is
split into at most `MAX_WINDOWS` windows; one that needs more keeps its
first `MAX_WINDOWS` (the head of the text, as model truncation keeps it) and
is flagged `truncated`. 512 windows cover a `max_text_chars` (100,000
character) text at the default overlap even where every character is a
token (CJK), and bound one input's work at 512 model rows whatever it holds.

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

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import InvalidInput
from pipeline.inputs import MIN_CHUNK_TOKENS
from pipeline.model import tokens
from pipeline.model.prompts import with_prompt

MAX_WINDOWS = 512

FloatMatrix = np.ndarray[Any, np.dtype[np.float32]]
IntVector = np.ndarray[Any, np.dtype[np.int64]]


@dataclass(frozen=True)
class Span:
    """One chunk of an input: its characters `[start, end)` and its word-piece tokens."""

    start: int
    end: int
    tokens: int


@dataclass(frozen=True)
class LateWindow:
    """A text the model embeds once for late chunking, and the chunks it pools.

    `rows` holds, per chunk, (its row within the input, the start and end of its
    characters in `text`, the prompt included); `tokens`, what the model embeds
    (the window's text tokens, the prompt's and the special tokens).
    """

    text: str
    rows: list[tuple[int, int, int]]
    tokens: int


@dataclass(frozen=True)
class Plan:
    """What the model embeds for a chunk's inputs: one text each, or its windows."""

    texts: list[str]
    sizes: list[int]
    weights: np.ndarray[Any, np.dtype[np.float64]]
    chunked: bool = False
    # Per input: whether it needed more than MAX_WINDOWS windows and lost its tail.
    cut: list[bool] = field(default_factory=list)
    # With `chunk_output: "chunks"`: each row's chunk (`texts` then are the chunks'
    # model texts, or, for late chunking, unused beside `windows`, one list an input).
    spans: list[Span] = field(default_factory=list)
    windows: list[list[LateWindow]] = field(default_factory=list)

    @property
    def starts(self) -> list[int]:
        """Position in `texts` of each input's first window."""
        return [0, *np.cumsum(self.sizes)[:-1].tolist()] if self.sizes else []

    def part(self, index: int) -> Plan:
        """The plan of one input alone."""
        start, size = self.starts[index], self.sizes[index]
        return Plan(self.texts[start:start + size], [size], self.weights[start:start + size],
                    self.chunked, self.cut[index:index + 1], self.spans[start:start + size],
                    self.windows[index:index + 1])

    def pool(
        self, vectors: FloatMatrix, counts: IntVector
    ) -> tuple[FloatMatrix, IntVector, IntVector]:
        """(one raw vector per input, its tokens in all, tokens that count for truncation).

        A chunked input is never truncated (its windows cover every token), so
        its truncation count is 0, unless it was cut at `MAX_WINDOWS`: then it
        is its tokens in all, over the model's limit, so it is flagged.
        """
        counts = np.asarray(counts, dtype=np.int64)
        if not self.chunked:
            return vectors, counts, counts
        starts = self.starts
        weighted = np.add.reduceat(vectors.astype(np.float64) * self.weights[:, None], starts)
        totals = np.add.reduceat(self.weights, starts)
        pooled = (weighted / totals[:, None]).astype(np.float32)
        summed = np.add.reduceat(counts, starts)
        cut = np.asarray(self.cut, dtype=bool) if self.cut else np.zeros(len(starts), dtype=bool)
        return pooled, summed, np.where(cut, summed, 0).astype(np.int64)


def plan_texts(
    texts: list[str], prompt: str, *, chunk: bool, overlap: int, model: str, max_seq_length: int
) -> Plan:
    """The plan for a chunk's texts: prompted, and split into windows when asked and needed."""
    if not chunk:
        return Plan(with_prompt(prompt, texts), [1] * len(texts), np.ones(len(texts)))
    tokenizer = tokens.tokenizer(model)
    _, budget = window_room(tokenizer, prompt, max_seq_length)
    budget = max(1, budget)
    model_texts: list[str] = []
    sizes: list[int] = []
    weights: list[int] = []
    cut: list[bool] = []
    for text, encoding in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False),
                              strict=True):
        windows = split_windows(text, encoding.offsets, budget, overlap)
        model_texts.extend(prompt + window for window, _ in windows)
        weights.extend(weight for _, weight in windows)
        sizes.append(len(windows))
        cut.append(count_windows(len(encoding.offsets), budget, overlap) > MAX_WINDOWS)
    return Plan(model_texts, sizes, np.asarray(weights, dtype=np.float64), chunked=True, cut=cut)


def check_windows(prompt: str, overlap: int, *, model: str, max_seq_length: int,
                  chunk_tokens: int | None = None) -> None:
    """422 unless the prompt leaves each window at least half its room, `chunk_tokens` fits
    a window, and the overlap leaves a stride of a quarter of a window or chunk (see the
    module docstring)."""
    tokenizer = tokens.tokenizer(model)
    room, budget = window_room(tokenizer, prompt, max_seq_length)
    most_prompt = room // 2
    if room - budget > most_prompt:
        raise InvalidInput(
            f"the prompt is {room - budget} tokens; with chunk=true it may take at most "
            f"{most_prompt} tokens (half of the {room} that {model}'s {max_seq_length}-token "
            "windows hold besides special tokens), so that every window carries the text; "
            "shorten the prompt, or submit without chunk", limit=most_prompt)
    if chunk_tokens is not None and chunk_tokens > budget:
        raise InvalidInput(
            f"'chunk_tokens' is {chunk_tokens}; with this prompt a window of {model} holds "
            f"{budget} tokens of text, so use {MIN_CHUNK_TOKENS} to {budget}", limit=budget)
    size = chunk_tokens or budget
    most_overlap = size - max(1, size // 4)
    if overlap > most_overlap:
        raise InvalidInput(
            f"'chunk_overlap' is {overlap} tokens; with this prompt a "
            f"{'chunk' if chunk_tokens else 'window'} holds {size} "
            f"tokens of text, so use 0 to {most_overlap}", limit=most_overlap)


def window_room(tokenizer: Any, prompt: str, max_seq_length: int) -> tuple[int, int]:
    """(tokens of text a window holds without the prompt, and with it)."""
    specials = len(tokenizer.encode("", add_special_tokens=True).ids)
    prompt_tokens = len(tokenizer.encode(prompt, add_special_tokens=False).ids) if prompt else 0
    room = max_seq_length - specials
    return room, room - prompt_tokens


def count_windows(n: int, budget: int, overlap: int) -> int:
    """How many windows `n` text tokens need (before the `MAX_WINDOWS` cap)."""
    if n <= budget:
        return 1
    stride = max(1, budget - overlap)
    return 1 + -(-(n - budget) // stride)


def split_windows(
    text: str, offsets: list[tuple[int, int]], budget: int, overlap: int,
    max_windows: int = MAX_WINDOWS,
) -> list[tuple[str, int]]:
    """(window text, its token count) for each window of `text` (one when it fits), at most
    `max_windows`, the first ones."""
    n = len(offsets)
    if n <= budget:
        return [(text, max(n, 1))]
    stride = max(1, budget - overlap)
    windows: list[tuple[str, int]] = []
    start = 0
    while True:
        end = min(start + budget, n)
        windows.append((text[offsets[start][0]:offsets[end - 1][1]], end - start))
        if end == n or len(windows) == max_windows:
            return windows
        start += stride
