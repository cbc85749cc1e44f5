"""What the MCP tools take and return: argument annotations and output models.

The output models become the tools' output schemas (the SDK derives them
from the return annotations) and structured results are validated against
them. Arguments whose rules carry a good error message in `pipeline.inputs`
(texts, ids, option values) are typed loosely here and checked there, so an
agent gets the same message as a REST client; the schemas still tell the
agent the rules up front.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, Field, WithJsonSchema

from pipeline.jobs import PUBLIC_STATUSES

TOP_K_MAX = 100

if TYPE_CHECKING:
    StatusName = str
else:
    # The Literal of the status values, derived from the enum so the two cannot drift
    # (mypy cannot evaluate a Literal built at run time, hence the plain str above).
    StatusName = Literal[tuple(s.value for s in PUBLIC_STATUSES)]
RESULTS_PAGE_DEFAULT = 20

JobId = Annotated[str, Field(description="The job_id submit_job returned (32 hex characters).")]
Normalize = Annotated[bool, Field(description="L2-normalize each vector (cosine = dot product).")]
Dimensions = Annotated[int | None, Field(
    description="Keep only the first N dimensions (Matryoshka truncation, renormalized); "
                "null for the model's full size.",
    json_schema_extra={"minimum": 1})]
Truncate = Annotated[bool, Field(
    description="Cut texts longer than the model's token limit and mark them truncated; "
                "false rejects such texts instead.")]
Model = Annotated[str | None, Field(description="Model name; null for the server's default model.")]
Encoding = Annotated[Literal["float", "base64", "float16", "int8", "uint8", "binary",
                             "ubinary"], Field(
    description="'float': vectors as JSON number arrays. 'base64': each vector as base64 of "
                "little-endian float32, about half the size; use it when you only pass vectors "
                "on, to keep your context small. 'float16': base64 of little-endian half "
                "floats, half of base64 again (within 0.001 of float for normalized vectors). "
                "'int8'/'uint8': one integer per dimension, scaled with the model's fixed "
                "per-dimension ranges. 'binary'/'ubinary': sign bits packed 8 to an integer "
                "(signed/unsigned byte), 32 times smaller than float.")]
Chunk = Annotated[bool, Field(
    description="Split a text longer than the model's token limit into overlapping windows and "
                "average their vectors (weighted by tokens) instead of truncating it.")]
ChunkOverlap = Annotated[int, Field(
    description="Tokens shared by consecutive windows when chunk is true.",
    json_schema_extra={"minimum": 0})]
ChunkOutput = Annotated[Literal["pooled", "chunks"] | None, Field(
    description="With chunk=true: 'pooled' (default) gives one vector per text; 'chunks' "
                "also gives each text's chunks with their character offsets and vectors.")]
Chunking = Annotated[Literal["separate", "late"] | None, Field(
    description="With chunk_output='chunks': 'separate' (default) embeds each chunk alone; "
                "'late' embeds each window once and averages its token embeddings over each "
                "chunk, so a chunk's vector sees its neighbours.")]
ChunkTokens = Annotated[int | None, Field(
    description="With chunk_output='chunks': tokens a chunk holds at most (8 up to the "
                "model's window); null for the model's window.")]
ChunkBoundary = Annotated[Literal["tokens", "sentence"] | None, Field(
    description="With chunk_output='chunks': cut chunks every chunk_tokens tokens "
                "('tokens', default) or at sentence ends, packed up to chunk_tokens.")]
Prompt = Annotated[str | None, Field(
    description="A literal prefix put before every text (e.g. 'query: '); null for none.")]
PromptName = Annotated[str | None, Field(
    description="The name of one of the model's configured prompts (list_models shows them); "
                "null for the model's default.")]
BulkInputs = Annotated[list[Any], WithJsonSchema({
    "type": "array",
    "minItems": 1,
    "description": "The texts, in order. Each is a string or {\"id\": str, \"text\": str, "
                   "\"metadata\": object}; id and metadata come back in results and searches.",
    "items": {"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "object", "required": ["text"], "additionalProperties": False, "properties": {
            "text": {"type": "string", "minLength": 1},
            "id": {"type": ["string", "null"], "maxLength": 256},
            "metadata": {"type": ["object", "null"]},
        }},
    ]},
})]
IdempotencyKey = Annotated[str | None, Field(
    description="Any string up to 255 characters; resubmitting with the same key returns the "
                "job the first call created instead of a new one (safe retries).")]
TimeoutS = Annotated[float | None, Field(
    description="Seconds the job may go without progress before it ends failed (with a "
                "reason); null for the server's bound (EMBEDSTREAM_JOB_TIMEOUT_S).",
    json_schema_extra={"exclusiveMinimum": 0})]
Cursor = Annotated[str | None, Field(
    description="next_cursor of the previous page; null for the first page.")]
Limit = Annotated[int, Field(description="Results per page, 1 to 1000.",
                             json_schema_extra={"minimum": 1, "maximum": 1000})]
TopK = Annotated[int, Field(description=f"How many inputs to return, 1 to {TOP_K_MAX}.",
                            json_schema_extra={"minimum": 1, "maximum": TOP_K_MAX})]
QueryText = Annotated[str, Field(description="The text to compare against.")]


class ChunkPiece(BaseModel):
    """One chunk of an input: `text[start:end]`, its tokens and its vector."""

    start: int
    end: int
    tokens: int
    embedding: list[int] | list[float] | str


class Embeddings(BaseModel):
    """Vectors for the given texts."""

    model: str
    dimensions: int
    embeddings: list[list[int] | list[float] | str] = Field(
        description="One vector per input, in input order (base64 strings with encoding=base64 "
                    "or float16, integers with int8/uint8/binary/ubinary).")
    truncated: list[int] = Field(
        description="Indexes of inputs cut at the model's token limit (empty if none).")
    chunks: list[int] | list[list[ChunkPiece]] | None = Field(
        default=None, description="With chunk=true: windows embedded per input (1 if it fit); "
                                  "with chunk_output='chunks', each input's chunks.")
    chunking: str | None = Field(
        default=None, description="With chunk_output='chunks': 'separate' or 'late'.")


class Match(BaseModel):
    """One candidate and its cosine similarity to the query."""

    text: str
    index: int = Field(description="Position of the candidate in the candidates list.")
    score: float = Field(description="Cosine similarity, -1 to 1.")


class Ranking(BaseModel):
    """Candidates ranked best first."""

    matches: list[Match]


class JobHandle(BaseModel):
    """A queued job."""

    job_id: str
    total: int = Field(description="Number of inputs.")
    status: str
    resource: str = Field(description="The job's MCP resource URI (its status as JSON).")


class JobStatus(BaseModel):
    """A job's status and progress."""

    id: str
    status: StatusName
    total: int
    done: int = Field(description="Inputs embedded so far.")
    failed: int = Field(description="Inputs that could not be embedded.")
    model: str
    dimensions: int
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    error: str | None
    backend: str | None = Field(
        default=None, description="What embedded the job (onnx, onnx-int8, openvino-bf16, torch…; "
                                  "comma-separated if workers of several did); null until then.")


class ResultRow(BaseModel):
    """The result for one input."""

    index: int
    id: str | None
    embedding: list[int] | list[float] | str | None = Field(
        description="The vector (base64 string with encoding=base64 or float16, integers with "
                    "the integer encodings); null if the input failed.")
    truncated: bool
    chunks: int | list[ChunkPiece] | None = Field(
        default=None, description="With chunk=true: windows embedded for this input; with "
                                  "chunk_output='chunks', its chunks.")
    chunking: str | None = Field(
        default=None, description="With chunk_output='chunks': 'separate' or 'late'.")
    error: str | None = None


class ResultsPage(BaseModel):
    """One page of results in input order."""

    results: list[ResultRow]
    next_cursor: str | None = Field(
        description="Pass it as cursor for the next page; null when there are no more. While the "
                    "job runs, a page ends at the first result not made yet.")
    backend: str | None = Field(
        default=None, description="What embedded the job, as job_status says.")


class SearchHit(BaseModel):
    """One input of the job and its similarity to the query."""

    index: int
    score: float = Field(description="Cosine similarity, -1 to 1.")
    text: str | None = None
    id: str | None = None
    metadata: dict[str, Any] | None = None


class SearchHits(BaseModel):
    """The job's inputs nearest to the query, best first."""

    matches: list[SearchHit]


class ServedModel(BaseModel):
    """A model that a live worker serves."""

    id: str
    object: str = "model"
    owned_by: str = "embedstream"
    dimensions: int
    max_tokens: int = Field(description="Tokens per text (and per window with chunk=true).")
    backend: str | None
    backend_reason: str | None = Field(
        default=None, description="With backend auto: why this backend (the figures it was "
                                  "chosen by); null when the backend was named.")
    prompts: dict[str, str] = Field(description="prompt_name -> the prefix it puts before texts.")


class ModelList(BaseModel):
    """The models live workers serve now."""

    object: str = "list"
    data: list[ServedModel]
