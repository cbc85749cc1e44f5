"""Counting tokens on the server side, for `truncate: false` submissions.

Only a job that asks to be rejected rather than truncated pays for this; the
workers count tokens for everything else as they embed. The tokenizer is read
from the model's local files (the `tokenizers` library, no torch).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import Unavailable
from pipeline.model.info import model_source


@functools.lru_cache(maxsize=8)
def _tokenizer(model: str) -> Any:
    from tokenizers import Tokenizer

    path = Path(model_source(model)) / "tokenizer.json"
    if path.is_file():
        tokenizer = Tokenizer.from_file(str(path))
    else:
        try:
            tokenizer = Tokenizer.from_pretrained(model)
        except Exception as exc:  # a hub error of any kind
            raise Unavailable(f"cannot load the tokenizer of {model!r} to check lengths or "
                              "cut windows; submit with truncate=true and without chunk "
                              "instead") from exc
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def count_tokens(model: str, texts: Sequence[str]) -> list[int]:
    """Tokens of each text, special tokens included, before any truncation."""
    encodings = _tokenizer(model).encode_batch(list(texts))
    return [len(e.ids) for e in encodings]


def tokenizer(model: str) -> Any:
    """The model's fast tokenizer (no truncation, no padding), loaded once per process."""
    return _tokenizer(model)
