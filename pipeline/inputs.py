"""Validating what clients submit: job options and input items.

Validation is hand-written rather than a Pydantic model because a bulk job
can carry a million inputs: one pass, no per-item object graph. Every error
names the field or the input index so a client can fix it.

Empty and whitespace-only texts are rejected (422), never embedded: the model
would turn `""` into a meaningless unit vector.

`prompt_name` is only checked for shape here; whether the model knows it is
checked against the model's prompts when the job's model is resolved
(`pipeline.prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import InvalidInput

OPTION_FIELDS = ("normalize", "dimensions", "truncate", "model", "chunk", "chunk_overlap",
                 "chunk_output", "chunking", "chunk_tokens", "chunk_boundary",
                 "prompt", "prompt_name", "timeout_s")
CHUNK_OUTPUTS = ("pooled", "chunks")
CHUNKINGS = ("separate", "late")
CHUNK_BOUNDARIES = ("tokens", "sentence")
MIN_CHUNK_TOKENS = 8
ITEM_FIELDS = ("id", "text", "metadata")
MAX_ID_CHARS = 256
MAX_PROMPT_CHARS = 1000
DEFAULT_CHUNK_OVERLAP = 32
MAX_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class JobOptions:
    """How a job's texts are embedded."""

    normalize: bool = True
    dimensions: int | None = None
    truncate: bool = True
    model: str | None = None
    chunk: bool = False
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP
    # Per-chunk vectors (`pipeline.model.spans`): what a chunked input returns, and how.
    chunk_output: str = "pooled"
    chunking: str = "separate"
    chunk_tokens: int | None = None  # None: the model's window
    chunk_boundary: str = "tokens"
    prompt: str | None = None
    prompt_name: str | None = None
    # Seconds without progress after which the job ends failed; None: the server's bound.
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)  # slots: a bulk job holds many at once
class Item:
    """One input: its text and the caller's optional id and metadata."""

    text: str
    id: str | None = None
    metadata: dict[str, Any] | None = None


def parse_options(raw: dict[str, Any], *, allowed_extra: tuple[str, ...] = ()) -> JobOptions:
    """Validate the option fields of a request body or query string."""
    unknown = sorted(set(raw) - set(OPTION_FIELDS) - set(allowed_extra))
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)}; allowed: "
                           f"{', '.join((*allowed_extra, *OPTION_FIELDS))}")
    dimensions = raw.get("dimensions")
    if dimensions is not None and (type(dimensions) is not int or dimensions < 1):
        raise InvalidInput("'dimensions' must be a positive integer or null")
    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise InvalidInput("'model' must be a non-empty string or null")
    prompt, prompt_name = _prompt(raw)
    chunk = _bool(raw, "chunk", False)
    return JobOptions(
        normalize=_bool(raw, "normalize", True),
        dimensions=dimensions,
        truncate=_bool(raw, "truncate", True),
        model=model,
        chunk=chunk,
        chunk_overlap=_overlap(raw),
        **_chunk_output(raw, chunk),
        prompt=prompt,
        prompt_name=prompt_name,
        timeout_s=_timeout(raw),
    )


def _timeout(raw: dict[str, Any]) -> float | None:
    value = raw.get("timeout_s")
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 < value <= MAX_TIMEOUT_S:
        raise InvalidInput(f"'timeout_s' must be a number of seconds above 0 and at most "
                           f"{MAX_TIMEOUT_S}, or null")
    return float(value)


def _overlap(raw: dict[str, Any]) -> int:
    overlap = raw.get("chunk_overlap")
    if overlap is None:
        return DEFAULT_CHUNK_OVERLAP
    if type(overlap) is not int or overlap < 0:
        raise InvalidInput("'chunk_overlap' must be a non-negative integer (tokens) or null")
    return overlap


def _chunk_output(raw: dict[str, Any], chunk: bool) -> dict[str, Any]:
    """`chunk_output`, `chunking`, `chunk_tokens`, `chunk_boundary`: each needs `chunk: true`."""
    given = [name for name in ("chunk_output", "chunking", "chunk_tokens", "chunk_boundary")
             if raw.get(name) is not None]
    if given and not chunk:
        raise InvalidInput(f"{', '.join(repr(g) for g in given)} need(s) 'chunk': true")
    tokens = raw.get("chunk_tokens")
    if tokens is not None and (type(tokens) is not int or tokens < MIN_CHUNK_TOKENS):
        raise InvalidInput(f"'chunk_tokens' must be an integer of at least {MIN_CHUNK_TOKENS} "
                           "(tokens) or null (the model's window)")
    output = _choice(raw, "chunk_output", CHUNK_OUTPUTS)
    shaping = [name for name in given if name != "chunk_output"]
    if shaping and output != "chunks":
        raise InvalidInput(f"{', '.join(repr(g) for g in shaping)} need(s) "
                           "'chunk_output': 'chunks'")
    return {"chunk_output": output,
            "chunking": _choice(raw, "chunking", CHUNKINGS),
            "chunk_tokens": tokens,
            "chunk_boundary": _choice(raw, "chunk_boundary", CHUNK_BOUNDARIES)}


def _choice(raw: dict[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    """One of `allowed` (the first when absent), or a 422 naming the field and its values."""
    value = raw.get(name)
    if value is None:
        return allowed[0]
    if value not in allowed:
        raise InvalidInput(f"'{name}' must be one of {', '.join(allowed)}, not {value!r}")
    return str(value)


def _prompt(raw: dict[str, Any]) -> tuple[str | None, str | None]:
    prompt, name = raw.get("prompt"), raw.get("prompt_name")
    if prompt is not None and (not isinstance(prompt, str) or len(prompt) > MAX_PROMPT_CHARS):
        raise InvalidInput(f"'prompt' must be a string of at most {MAX_PROMPT_CHARS} "
                           "characters or null")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise InvalidInput("'prompt_name' must be a non-empty string or null")
    if prompt is not None and name is not None:
        raise InvalidInput("give 'prompt' or 'prompt_name', not both")
    return prompt, name


def parse_query_options(query: dict[str, str]) -> JobOptions:
    """Options given as query parameters (for NDJSON uploads)."""
    raw: dict[str, Any] = {}
    for name, value in query.items():
        if name in ("normalize", "truncate", "chunk"):
            raw[name] = _query_bool(name, value)
        elif name in ("dimensions", "chunk_overlap", "chunk_tokens"):
            raw[name] = _query_int(name, value) if value not in ("", "null") else None
        elif name == "prompt_name":
            raw[name] = value or None
        elif name == "timeout_s":
            raw[name] = _query_number(name, value) if value not in ("", "null") else None
        else:
            raw[name] = value
    return parse_options(raw)


def parse_item(raw: Any, index: int, *, max_chars: int) -> Item:
    """Validate one input: a string or {"id", "text", "metadata"}."""
    if isinstance(raw, str):
        return Item(_text(raw, index, max_chars))
    if not isinstance(raw, dict):
        raise InvalidInput(
            f"inputs[{index}] must be a string or an object with 'text', "
            f"not {_json_type(raw)}", index=index)
    unknown = sorted(set(raw) - set(ITEM_FIELDS))
    if unknown:
        raise InvalidInput(f"inputs[{index}] has unknown field(s): {', '.join(unknown)}",
                           index=index)
    if "text" not in raw:
        raise InvalidInput(f"inputs[{index}] has no 'text'", index=index)
    item_id = raw.get("id")
    if item_id is not None and (not isinstance(item_id, str) or len(item_id) > MAX_ID_CHARS):
        raise InvalidInput(f"inputs[{index}].id must be a string of at most "
                           f"{MAX_ID_CHARS} characters", index=index)
    metadata = raw.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidInput(f"inputs[{index}].metadata must be an object", index=index)
    return Item(_text(raw["text"], index, max_chars), item_id, metadata)


def _text(value: Any, index: int, max_chars: int) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"inputs[{index}] text must be a string, not {_json_type(value)}",
                           index=index)
    if not value.strip():
        raise InvalidInput(f"inputs[{index}] is empty or whitespace only; "
                           "remove it or give it text", index=index)
    if len(value) > max_chars:
        raise InvalidInput(f"inputs[{index}] has {len(value)} characters; "
                           f"the limit is {max_chars}", index=index)
    return value


def _bool(raw: dict[str, Any], name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise InvalidInput(f"'{name}' must be true or false")
    return value


def _query_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise InvalidInput(f"query parameter '{name}' must be true or false")


def _query_number(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidInput(f"query parameter '{name}' must be a number") from None


def _query_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"query parameter '{name}' must be an integer") from None


def _json_type(value: Any) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", list: "an array",
             dict: "an object", str: "a string", type(None): "null"}
    return names.get(type(value), type(value).__name__)
