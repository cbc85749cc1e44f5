"""Token windows of long inputs, and pooling their vectors back to one per input."""

import numpy as np

from pipeline.model.info import DEFAULT_MODEL
from pipeline.model.tokens import tokenizer
from pipeline.model.windows import Plan, plan_texts, split_windows


def offsets(n: int) -> list[tuple[int, int]]:
    """Offsets of n one-character tokens separated by spaces."""
    return [(2 * i, 2 * i + 1) for i in range(n)]


def test_a_text_that_fits_is_one_window() -> None:
    text = " ".join("abcde")
    assert split_windows(text, offsets(5), budget=5, overlap=2) == [(text, 5)]


def test_windows_overlap_and_the_last_ends_at_the_last_token() -> None:
    text = " ".join("abcdefghij")
    windows = split_windows(text, offsets(10), budget=4, overlap=1)
    assert windows == [("a b c d", 4), ("d e f g", 4), ("g h i j", 4)]
    windows = split_windows(text, offsets(10), budget=4, overlap=2)
    assert [w for w, _ in windows] == ["a b c d", "c d e f", "e f g h", "g h i j"]


def test_a_short_tail_window_weighs_less() -> None:
    text = " ".join("abcdefg")
    assert split_windows(text, offsets(7), budget=5, overlap=0) == [("a b c d e", 5), ("f g", 2)]


def test_pooling_is_the_token_weighted_mean_per_input() -> None:
    plan = Plan(["a", "b1", "b2", "c"], [1, 2, 1], np.array([3.0, 4.0, 1.0, 2.0]), chunked=True)
    vectors = np.array([[1, 0], [1, 1], [0, 5], [2, 2]], dtype=np.float32)
    pooled, tokens, longest = plan.pool(vectors, np.array([5, 6, 3, 4]))
    assert np.allclose(pooled[1], (4 * np.array([1, 1]) + 1 * np.array([0, 5])) / 5)
    assert np.allclose(pooled[[0, 2]], vectors[[0, 3]])
    assert tokens.tolist() == [5, 9, 4]
    assert longest.tolist() == [0, 0, 0]  # a chunked input is never truncated
    assert plan.part(1).texts == ["b1", "b2"]


def test_the_prompt_leads_every_window_and_shrinks_its_budget() -> None:
    long_text = " ".join(["word"] * 600)
    plan = plan_texts(["short", long_text], "query: ", chunk=True, overlap=32,
                      model=DEFAULT_MODEL, max_seq_length=256)
    assert plan.sizes[0] == 1 and plan.sizes[1] > 2
    assert all(text.startswith("query: ") for text in plan.texts)
    counted = tokenizer(DEFAULT_MODEL)
    assert max(len(counted.encode(t).ids) for t in plan.texts) <= 256
    assert plan.weights[1] == 256 - 2 - len(counted.encode("query: ",
                                                           add_special_tokens=False).ids)


def test_without_chunk_texts_are_only_prompted() -> None:
    plan = plan_texts(["a", "b"], "p: ", chunk=False, overlap=0, model="any", max_seq_length=4)
    assert plan.texts == ["p: a", "p: b"] and not plan.chunked
