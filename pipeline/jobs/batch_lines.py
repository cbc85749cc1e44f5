"""The lines of a batch's input file: each one checked as OpenAI checks it.

A line is `{"custom_id", "method": "POST", "url": "/v1/embeddings", "body":
{...}}`, where `body` is a `/v1/embeddings` request: `input` (a text or a
list of texts), `model`, `encoding_format`, `dimensions`, `user`, and any of
embedstream's job options (`parse_options` decides which). A refused line
is a `BatchError` with OpenAI's code where OpenAI has one (`invalid_json_line`,
`missing_required_parameter`, `url_mismatch`, `duplicate_custom_id`,
`model_mismatch`, `empty_file`, `too_many_tasks`) and ours where it has
none (`invalid_method`, `invalid_custom_id`, `invalid_request`,
`options_mismatch`, `line_too_large`), and the line's number.

A batch is one job, so every request must ask for the model, options and
`encoding_format` of the first one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.errors import InvalidInput, InvalidRequest, PipelineError
from pipeline.inputs import MAX_ID_CHARS, JobOptions, parse_item, parse_options
from pipeline.jobs.quantize import check_encoding

ENDPOINT = "/v1/embeddings"
COMPLETION_WINDOWS = ("24h",)
MAX_REQUESTS = 100_000
MAX_LINE_BYTES = 4 * 1024 * 1024
MAX_METADATA = (16, 64, 512)  # pairs, key characters, value characters
NOT_OPTIONS = ("input", "encoding_format", "user")  # body fields that are not job options


@dataclass(frozen=True)
class BatchError:
    """One reason a batch failed, as OpenAI's `errors.data` shows it."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None


class LineError(Exception):
    """A refused line of an input file."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass(frozen=True)
class LineRequest:
    """One valid line: its custom_id, its texts, the job options and encoding it asks for."""

    custom_id: str
    texts: list[str]
    options: JobOptions
    encoding: str


@dataclass
class Validation:
    """What the first pass over a file found: the requests' shape, or what is wrong."""

    errors: list[BatchError] = field(default_factory=list)
    requests: int = 0
    inputs: int = 0
    first_line: int = 0
    options: JobOptions = field(default_factory=JobOptions)
    encoding: str = "float"
    seen: set[str] = field(default_factory=set)

    def add(self, number: int, request: LineRequest, max_inputs: int) -> None:
        """Count a valid line, or note why it cannot join this batch."""
        if request.custom_id in self.seen:
            raise LineError("duplicate_custom_id", "The custom_id for this request is a "
                            "duplicate of another request. The custom_id parameter must be "
                            "unique for each request in a batch.", "custom_id")
        if not self.requests:
            self.first_line, self.options, self.encoding = number, request.options, request.encoding
        elif request.options.model != self.options.model:
            raise LineError("model_mismatch", "every request of a batch must use the model of "
                            f"its first (line {self.first_line})", "body.model")
        elif (request.options, request.encoding) != (self.options, self.encoding):
            raise LineError("options_mismatch", "every request of a batch is one job and must "
                            "give the options and encoding_format of its first (line "
                            f"{self.first_line})", "body")
        if self.requests + 1 > MAX_REQUESTS or self.inputs + len(request.texts) > max_inputs:
            raise LineError("too_many_tasks", f"a batch holds at most {MAX_REQUESTS} requests "
                            f"and {max_inputs} inputs")
        self.seen.add(request.custom_id)
        self.requests += 1
        self.inputs += len(request.texts)


def check_line(data: bytes | None, *, max_chars: int, max_texts: int) -> LineRequest:
    """One line of an input file as a request, or the LineError OpenAI would give."""
    if data is None:
        raise LineError("line_too_large", f"the line is over {MAX_LINE_BYTES} bytes")
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise LineError("invalid_json_line", "This line is not parseable as valid JSON.") from None
    if not isinstance(value, dict):
        raise LineError("invalid_json_line", "This line is not a JSON object.")
    custom_id = _required(value, "custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_ID_CHARS:
        raise LineError("invalid_custom_id", "custom_id must be a non-empty string of at most "
                        f"{MAX_ID_CHARS} characters", "custom_id")
    if _required(value, "method") != "POST":
        raise LineError("invalid_method", "method must be POST", "method")
    if _required(value, "url") != ENDPOINT:
        raise LineError("url_mismatch", "The URL provided for this request does not match "
                        f"the batch endpoint ({ENDPOINT}).", "url")
    body = _required(value, "body")
    if not isinstance(body, dict):
        raise LineError("invalid_request", "body must be a JSON object", "body")
    try:
        texts = _texts(_required(body, "input", "body."), max_chars, max_texts)
        options = parse_options({k: v for k, v in body.items() if k not in NOT_OPTIONS})
        encoding = check_encoding(body.get("encoding_format") or None, "'encoding_format'",
                                  error=InvalidInput)
    except InvalidInput as exc:
        raise LineError("invalid_request", exc.message, "body") from None
    return LineRequest(custom_id, texts, options, encoding)


def _required(value: dict[str, Any], name: str, where: str = "") -> Any:
    if name not in value:
        raise LineError("missing_required_parameter",
                        f"Missing required parameter: '{where}{name}'.", f"{where}{name}")
    return value[name]


def _texts(raw: object, max_chars: int, max_texts: int) -> list[str]:
    """`input`: one text or a non-empty list of texts (token arrays are not supported)."""
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts or len(texts) > max_texts:
        raise InvalidInput(f"'input' must be a string or a list of 1 to {max_texts} strings")
    if not all(isinstance(text, str) for text in texts):
        raise InvalidInput("'input' items must be strings (token arrays are not supported)")
    return [parse_item(text, i, max_chars=max_chars).text for i, text in enumerate(texts)]


def check_metadata(metadata: object) -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 string pairs, keys of 64 and values of 512 characters."""
    pairs, key_chars, value_chars = MAX_METADATA
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > pairs or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= key_chars
            and len(v) <= value_chars for k, v in metadata.items()):
        raise InvalidRequest(f"'metadata' must be an object of at most {pairs} string pairs, "
                             f"keys of at most {key_chars} and values of at most {value_chars} "
                             "characters")
    return metadata


def option_error(exc: PipelineError, line: int) -> BatchError:
    """A batch error for the model or an option the file's requests name (say, no such model)."""
    return BatchError(exc.code, exc.message, line, "body")


def check_create(endpoint: object, completion_window: object) -> None:
    """The batch's endpoint and window must be ones embedstream serves."""
    if endpoint != ENDPOINT:
        raise InvalidRequest(f"'endpoint' must be {ENDPOINT!r}: embedstream batches embed "
                             f"text; got {str(endpoint)[:60]!r}")
    if completion_window not in COMPLETION_WINDOWS:
        raise InvalidRequest(f"'completion_window' must be one of {', '.join(COMPLETION_WINDOWS)}")
