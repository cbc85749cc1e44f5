"""Per-chunk vectors: where an input's chunks begin and end, and late chunking.

With `chunk_output: "chunks"` a chunked input returns its chunks, each with
its characters `[start, end)` in the input, its token count and its vector.
Boundaries (`ChunkSpec`):

- `tokens`: chunks of `size` word pieces (`chunk_tokens`, default what a
  window holds), consecutive chunks sharing `chunk_overlap` tokens, the last
  ending at the text's last token: the cut `pipeline.model.windows` makes;
- `sentence`: a regex splitter (a sentence ends after `.`, `!`, `?` or `…`,
  closing quotes or brackets, then white space; or at a line break), and
  sentences packed in order into chunks of at most `size` tokens; a sentence
  longer than that is cut by tokens. Sentence chunks do not overlap. It knows
  nothing of abbreviations ("e.g. this" ends a sentence): good enough to keep
  chunks from ending mid-sentence, not a linguistic tool.

Chunks start and end at token boundaries, so `text[start:end]` is exactly
the chunk's text. Then:

- `separate` chunking embeds each chunk's text alone (prompt included), as
  windows are embedded: batched, deduplicated and cached with other texts;
- `late` chunking packs consecutive chunks into windows of at most what the
  model takes, embeds each window once, and a chunk's vector is the mean of
  the window's token embeddings whose characters lie inside the chunk, so it
  has seen its neighbours. A chunk lies in exactly one window.

The input's own vector is, as for windows, the token-weighted mean of its
chunks' raw vectors. An input keeps at most `MAX_WINDOWS` chunks (the first:
one input's work stays bounded) and is flagged `truncated` past that.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.model import tokens
from pipeline.model.windows import MAX_WINDOWS, LateWindow, Plan, Span, window_room

if TYPE_CHECKING:
    from pipeline.model.embedder import Embedded

_SENTENCE_END = re.compile("[.!?\u2026]+[\"'\u201d\u2019)\\]]*\\s+|\n")

Offsets = list[tuple[int, int]]


@dataclass(frozen=True)
class ChunkSpec:
    """How a job with `chunk_output: "chunks"` cuts and embeds its chunks."""

    late: bool = False
    size: int = 0  # tokens a chunk holds at most; 0: what a window holds
    sentences: bool = False


@dataclass(frozen=True)
class TokenEmbeddings:
    """A text's token embeddings (special tokens left out) and each token's characters."""

    vectors: np.ndarray[Any, np.dtype[np.float32]]
    offsets: np.ndarray[Any, np.dtype[np.int64]]


def plan_chunks(texts: list[str], prompt: str, spec: ChunkSpec, *, overlap: int, model: str,
                max_seq_length: int) -> Plan:
    """The plan of a chunk's texts cut into chunks: a row each (see the module docstring)."""
    tokenizer = tokens.tokenizer(model)
    budget = max(1, window_room(tokenizer, prompt, max_seq_length)[1])
    overhead = max_seq_length - budget  # a window's special and prompt tokens
    size = min(spec.size or budget, budget)
    spans: list[Span] = []
    sizes: list[int] = []
    windows: list[list[LateWindow]] = []
    cut: list[bool] = []
    for text, encoding in zip(texts, tokenizer.encode_batch(texts, add_special_tokens=False),
                              strict=True):
        offsets: Offsets = [tuple(o) for o in encoding.offsets]
        ranges = (sentence_ranges(text, offsets, size) if spec.sentences
                  else token_ranges(len(offsets), size, overlap))
        cut.append(len(ranges) > MAX_WINDOWS)
        ranges = ranges[:MAX_WINDOWS]
        mine = [_span(text, offsets, first, last) for first, last in ranges]
        spans.extend(mine)
        sizes.append(len(mine))
        if spec.late:
            windows.append(late_windows(text, prompt, offsets, ranges, budget, overhead))
    return Plan([prompt + text[s.start:s.end] for text, s in _texts_of(texts, sizes, spans)],
                sizes, np.asarray([max(1, s.tokens) for s in spans], dtype=np.float64),
                chunked=True, cut=cut, spans=spans, windows=windows)


def _texts_of(texts: list[str], sizes: list[int], spans: list[Span]) -> list[tuple[str, Span]]:
    """Each span beside the text it cuts."""
    owners = [text for text, size in zip(texts, sizes, strict=True) for _ in range(size)]
    return list(zip(owners, spans, strict=True))


def _span(text: str, offsets: Offsets, first: int, last: int) -> Span:
    if not offsets:  # a text of no word pieces is one chunk, whole
        return Span(0, len(text), 0)
    return Span(offsets[first][0], offsets[last - 1][1], last - first)


def token_ranges(n: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token ranges `[first, last)` of `size` tokens sharing `overlap`, covering `n` tokens."""
    if n <= size:
        return [(0, n)]
    stride = max(1, size - overlap)
    ranges = []
    first = 0
    while True:
        last = min(first + size, n)
        ranges.append((first, last))
        if last == n or len(ranges) > MAX_WINDOWS:
            return ranges
        first += stride


def sentence_ranges(text: str, offsets: Offsets, size: int) -> list[tuple[int, int]]:
    """Token ranges of whole sentences packed up to `size` tokens (longer ones cut)."""
    if not offsets:
        return [(0, 0)]
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    # A token belongs to the sentence its first character is in.
    firsts: list[int] = []
    current = -1
    for i, (start, _) in enumerate(offsets):
        sentence = bisect.bisect_right(ends, start)
        if sentence != current:
            firsts.append(i)
            current = sentence
    sentences = list(zip(firsts, [*firsts[1:], len(offsets)], strict=True))
    ranges: list[tuple[int, int]] = []
    for first, last in sentences:
        if ranges and last - ranges[-1][0] <= size:
            ranges[-1] = (ranges[-1][0], last)
            continue
        ranges.extend((a, min(a + size, last)) for a in range(first, last, size))
    return ranges


def late_windows(text: str, prompt: str, offsets: Offsets, ranges: list[tuple[int, int]],
                 budget: int, overhead: int) -> list[LateWindow]:
    """Consecutive chunks packed into windows of at most `budget` tokens (and `overhead`
    prompt and special tokens each)."""
    if not offsets:
        return [LateWindow(prompt + text, [(0, len(prompt), len(prompt) + len(text))],
                           overhead)]
    windows: list[LateWindow] = []
    i = 0
    while i < len(ranges):
        first = ranges[i][0]
        j = i + 1
        while j < len(ranges) and ranges[j][1] - first <= budget:
            j += 1
        begin = offsets[first][0]
        shift = len(prompt) - begin
        rows = [(k, offsets[a][0] + shift, offsets[b - 1][1] + shift)
                for k, (a, b) in enumerate(ranges[i:j], start=i)]
        last = ranges[j - 1][1]
        windows.append(LateWindow(prompt + text[begin:offsets[last - 1][1]], rows,
                                  overhead + last - first))
        i = j
    return windows


def pool_late(plan: Plan, outputs: list[TokenEmbeddings], dims: int) -> Embedded:
    """Each chunk's raw vector: the mean of its window's token embeddings inside its span.

    The token counts are what the model embedded (what `usage` adds up): each
    window's tokens, counted on its first chunk, so a token two chunks share
    counts once and the prompt and special tokens count too.
    """
    from pipeline.model.embedder import Embedded

    rows = np.zeros((len(plan.spans), dims), dtype=np.float32)
    counts = np.zeros(len(plan.spans), dtype=np.int64)
    flat = iter(outputs)
    for base, windows in zip(plan.starts, plan.windows, strict=True):
        for window in windows:
            out = next(flat)
            counts[base + window.rows[0][0]] = window.tokens
            for row, start, end in window.rows:
                inside = (out.offsets[:, 0] >= start) & (out.offsets[:, 1] <= end)
                if inside.any():
                    rows[base + row] = out.vectors[inside].mean(axis=0)
    return Embedded(rows, counts)


def window_texts(plan: Plan) -> list[str]:
    """The texts late chunking hands the model, in the order `pool_late` reads them."""
    return [window.text for windows in plan.windows for window in windows]
