"""Validating submitted options and input items: every bad input is a named InvalidInput."""

from typing import Any

import pytest

from pipeline.errors import InvalidInput, InvalidRequest
from pipeline.inputs import (
    MAX_ID_CHARS,
    Item,
    JobOptions,
    parse_item,
    parse_options,
    parse_query_options,
)

MAX_CHARS = 100


def reject_item(raw: Any, index: int = 3) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        parse_item(raw, index, max_chars=MAX_CHARS)
    return caught.value


def reject_options(raw: dict[str, Any]) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        parse_options(raw)
    return caught.value


# Options


def test_no_options_give_the_defaults() -> None:
    assert parse_options({}) == JobOptions(normalize=True, dimensions=None, truncate=True,
                                           model=None)


def test_nulls_mean_the_defaults() -> None:
    options = parse_options({"normalize": None, "dimensions": None, "truncate": None,
                             "model": None})
    assert options == JobOptions()


def test_every_option_is_read() -> None:
    options = parse_options({"normalize": False, "dimensions": 64, "truncate": False,
                             "model": "all-MiniLM-L6-v2"})
    assert options == JobOptions(normalize=False, dimensions=64, truncate=False,
                                 model="all-MiniLM-L6-v2")


def test_unknown_option_fields_are_named_with_the_allowed_ones() -> None:
    error = reject_options({"normalise": True, "dims": 3})
    assert "dims" in error.message and "normalise" in error.message
    assert "allowed" in error.message and "dimensions" in error.message


def test_extra_fields_can_be_allowed_by_the_caller() -> None:
    assert parse_options({"inputs": []}, allowed_extra=("inputs",)) == JobOptions()
    with pytest.raises(InvalidInput, match="inputs"):
        parse_options({"inputs": []})


@pytest.mark.parametrize("dimensions", [0, -1, -384, True, False, 1.0, 64.5, "64", [64],
                                        {"n": 64}])
def test_dimensions_must_be_a_positive_integer(dimensions: Any) -> None:
    error = reject_options({"dimensions": dimensions})
    assert "'dimensions'" in error.message


@pytest.mark.parametrize("name", ["normalize", "truncate"])
@pytest.mark.parametrize("value", [1, 0, "true", "yes", [], {}, 1.0])
def test_flags_must_be_booleans(name: str, value: Any) -> None:
    error = reject_options({name: value})
    assert f"'{name}'" in error.message


@pytest.mark.parametrize("model", ["", "   ", 7, ["all-MiniLM-L6-v2"], True])
def test_model_must_be_a_non_empty_string(model: Any) -> None:
    error = reject_options({"model": model})
    assert "'model'" in error.message


def test_invalid_input_is_an_invalid_request_with_status_422() -> None:
    error = reject_options({"dimensions": -1})
    assert isinstance(error, InvalidRequest)
    assert (error.status, error.code) == (422, "invalid_input")


# Query-string options (NDJSON uploads)


def test_query_options_parse_text_values() -> None:
    options = parse_query_options({"normalize": "false", "truncate": "0", "dimensions": "32",
                                   "model": "all-MiniLM-L6-v2"})
    assert options == JobOptions(normalize=False, dimensions=32, truncate=False,
                                 model="all-MiniLM-L6-v2")


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("yes", True),
                                            ("TRUE", True), ("false", False), ("0", False),
                                            ("no", False)])
def test_query_flags_accept_common_spellings(value: str, expected: bool) -> None:
    assert parse_query_options({"normalize": value}).normalize is expected


@pytest.mark.parametrize("value", ["", "null"])
def test_empty_or_null_query_dimensions_mean_the_model_default(value: str) -> None:
    assert parse_query_options({"dimensions": value}).dimensions is None


@pytest.mark.parametrize("query,named", [
    ({"normalize": "maybe"}, "normalize"),
    ({"truncate": ""}, "truncate"),
    ({"dimensions": "abc"}, "dimensions"),
    ({"dimensions": "1.5"}, "dimensions"),
    ({"dimensions": "0"}, "dimensions"),
    ({"dimensions": "-8"}, "dimensions"),
    ({"model": ""}, "model"),
    ({"colour": "blue"}, "colour"),
])
def test_bad_query_options_are_named(query: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_query_options(query)
    assert named in caught.value.message


# Items


def test_a_string_is_an_input_without_id() -> None:
    assert parse_item("hello world", 0, max_chars=MAX_CHARS) == Item("hello world")


def test_an_object_carries_id_and_metadata() -> None:
    item = parse_item({"id": "doc-1", "text": "hello", "metadata": {"page": 2}}, 0,
                      max_chars=MAX_CHARS)
    assert item == Item("hello", "doc-1", {"page": 2})


def test_id_and_metadata_may_be_null() -> None:
    assert parse_item({"text": "hello", "id": None, "metadata": None}, 0,
                      max_chars=MAX_CHARS) == Item("hello")


def test_text_keeps_its_surrounding_whitespace() -> None:
    assert parse_item("  padded  ", 0, max_chars=MAX_CHARS).text == "  padded  "


def test_text_of_exactly_the_limit_is_accepted() -> None:
    assert parse_item("x" * MAX_CHARS, 0, max_chars=MAX_CHARS).text == "x" * MAX_CHARS


@pytest.mark.parametrize("text", ["", " ", "\t\n", "\u00a0\u2003", "\r\n  \r\n"])
def test_empty_or_whitespace_only_text_is_rejected_with_its_index(text: str) -> None:
    for raw in (text, {"text": text}):
        error = reject_item(raw, index=7)
        assert "inputs[7]" in error.message and "empty" in error.message
        assert error.detail == {"index": 7}


@pytest.mark.parametrize("text", [None, 5, 1.5, True, ["a"], {"t": "a"}])
def test_non_string_text_is_rejected(text: Any) -> None:
    error = reject_item({"text": text}, index=2)
    assert "inputs[2]" in error.message and "must be a string" in error.message


@pytest.mark.parametrize("raw", [None, 5, 1.5, True, ["a", "b"]])
def test_an_input_must_be_a_string_or_an_object(raw: Any) -> None:
    error = reject_item(raw, index=4)
    assert "inputs[4]" in error.message and "string or an object" in error.message


def test_an_object_without_text_is_rejected() -> None:
    error = reject_item({"id": "a"})
    assert "no 'text'" in error.message


def test_unknown_item_fields_are_named() -> None:
    error = reject_item({"text": "a", "embedding": [1], "Text": "b"}, index=9)
    assert "inputs[9]" in error.message
    assert "Text" in error.message and "embedding" in error.message


def test_too_long_text_is_rejected_with_its_length_and_the_limit() -> None:
    error = reject_item("x" * (MAX_CHARS + 1), index=1)
    assert "inputs[1]" in error.message
    assert str(MAX_CHARS + 1) in error.message and str(MAX_CHARS) in error.message


@pytest.mark.parametrize("metadata", ["note", 3, ["a"], True])
def test_metadata_must_be_an_object(metadata: Any) -> None:
    error = reject_item({"text": "a", "metadata": metadata}, index=0)
    assert "inputs[0].metadata" in error.message


@pytest.mark.parametrize("item_id", [5, 1.5, True, ["a"], {"a": 1}, "x" * (MAX_ID_CHARS + 1)])
def test_id_must_be_a_short_string(item_id: Any) -> None:
    error = reject_item({"text": "a", "id": item_id}, index=6)
    assert "inputs[6].id" in error.message and str(MAX_ID_CHARS) in error.message


def test_an_id_of_the_maximum_length_is_accepted() -> None:
    item = parse_item({"text": "a", "id": "i" * MAX_ID_CHARS}, 0, max_chars=MAX_CHARS)
    assert item.id == "i" * MAX_ID_CHARS


# Chunking and prompts


def test_chunk_and_prompt_options_are_read() -> None:
    options = parse_options({"chunk": True, "chunk_overlap": 16, "prompt": "query: "})
    assert (options.chunk, options.chunk_overlap, options.prompt) == (True, 16, "query: ")
    assert parse_options({"prompt_name": "query"}).prompt_name == "query"
    defaults = parse_options({})
    assert (defaults.chunk, defaults.chunk_overlap, defaults.prompt) == (False, 32, None)


@pytest.mark.parametrize("raw,field", [
    ({"chunk": "yes"}, "'chunk'"), ({"chunk_overlap": -1}, "'chunk_overlap'"),
    ({"chunk_overlap": 2.5}, "'chunk_overlap'"), ({"prompt": 3}, "'prompt'"),
    ({"prompt_name": ""}, "'prompt_name'"), ({"prompt": "a", "prompt_name": "b"}, "not both"),
])
def test_bad_chunk_and_prompt_options_are_named(raw: dict[str, Any], field: str) -> None:
    assert field in reject_options(raw).message


def test_query_options_read_chunk_and_prompts() -> None:
    options = parse_query_options({"chunk": "true", "chunk_overlap": "8", "prompt": "q: ",
                                   "prompt_name": ""})
    assert (options.chunk, options.chunk_overlap, options.prompt) == (True, 8, "q: ")
