"""Bounds on chunked inputs: a prompt that leaves windows no room for text is refused, and
an input is split into at most MAX_WINDOWS windows (the rest cut, and flagged)."""

import numpy as np
import pytest

from pipeline.errors import InvalidInput
from pipeline.model.info import DEFAULT_MODEL
from pipeline.model.tokens import tokenizer
from pipeline.model.windows import (
    MAX_WINDOWS,
    check_windows,
    count_windows,
    plan_texts,
    split_windows,
)


def prompt_of(tokens: int) -> str:
    """A prompt of exactly `tokens` word-piece tokens for the default model."""
    prompt = " ".join(["word"] * tokens)
    assert len(tokenizer(DEFAULT_MODEL).encode(prompt, add_special_tokens=False).ids) == tokens
    return prompt


def test_a_prompt_over_half_of_a_window_is_refused_naming_the_limit() -> None:
    with pytest.raises(InvalidInput) as raised:
        check_windows(prompt_of(254), 32, model=DEFAULT_MODEL, max_seq_length=256)
    assert "254 tokens" in raised.value.message and "at most 127" in raised.value.message
    with pytest.raises(InvalidInput, match="at most 127"):
        check_windows(prompt_of(128), 0, model=DEFAULT_MODEL, max_seq_length=256)


def test_a_prompt_of_up_to_half_a_window_is_accepted() -> None:
    check_windows("", 128, model=DEFAULT_MODEL, max_seq_length=256)
    check_windows("query: ", 128, model=DEFAULT_MODEL, max_seq_length=256)
    check_windows(prompt_of(127), 32, model=DEFAULT_MODEL, max_seq_length=256)


def test_an_overlap_that_leaves_windows_almost_no_new_text_is_refused() -> None:
    # 127 tokens of text per window: the stride must stay at least 31 tokens.
    check_windows(prompt_of(127), 96, model=DEFAULT_MODEL, max_seq_length=256)
    with pytest.raises(InvalidInput, match="use 0 to 96"):
        check_windows(prompt_of(127), 97, model=DEFAULT_MODEL, max_seq_length=256)


def test_the_window_count_matches_the_split() -> None:
    text = " ".join("x" * 60)
    offsets = [(2 * i, 2 * i + 1) for i in range(60)]
    for n in (1, 5, 9, 10, 11, 37, 60):
        for budget, overlap in ((10, 0), (10, 3), (10, 9), (4, 1), (60, 5)):
            windows = split_windows(text, offsets[:n], budget, overlap, max_windows=10_000)
            assert count_windows(n, budget, overlap) == len(windows), (n, budget, overlap)


def test_an_input_needing_more_than_max_windows_keeps_the_first_and_is_flagged_truncated(
) -> None:
    # 16-token windows hold 14 tokens of text: 8,000 words need 572 windows at stride 14.
    long_text = " ".join(["word"] * 8000)
    plan = plan_texts(["short", long_text], "", chunk=True, overlap=0, model=DEFAULT_MODEL,
                      max_seq_length=16)
    assert count_windows(8000, 14, 0) > MAX_WINDOWS
    assert plan.sizes == [1, MAX_WINDOWS] and plan.cut == [False, True]
    assert plan.texts[1] == plan.texts[MAX_WINDOWS] == " ".join(["word"] * 14)  # the head
    vectors = np.ones((len(plan.texts), 3), dtype=np.float32)
    counts = np.full(len(plan.texts), 16)
    _, tokens, longest = plan.pool(vectors, counts)
    assert longest[0] == 0 and longest[1] > 16  # the worker flags it: longest > max_seq_length
    assert tokens[1] == 16 * MAX_WINDOWS
    assert plan.part(1).pool(vectors[1:], counts[1:])[2][0] > 16


def test_an_input_within_max_windows_is_whole_and_not_flagged() -> None:
    text = " ".join(["word"] * 600)
    plan = plan_texts([text], "", chunk=True, overlap=2, model=DEFAULT_MODEL,
                      max_seq_length=16)
    assert plan.cut == [False] and plan.sizes == [count_windows(600, 14, 2)]
    assert plan.texts[-1].endswith("word") and plan.weights.sum() >= 600
    _, _, longest = plan.pool(np.ones((len(plan.texts), 2), dtype=np.float32),
                              np.full(len(plan.texts), 16))
    assert longest.tolist() == [0]
