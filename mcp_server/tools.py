"""The MCP tools: the pipeline for AI agents, one method per tool.

Each tool validates with `pipeline.inputs`, calls the `Pipeline`, and returns
a `CallToolResult` whose structured content matches the output model in its
return annotation (the SDK publishes the schema and validates against it).
Errors become MCP tool errors (`isError: true`) in one place, `tool_errors`:
a `PipelineError` keeps its code and message, a lost Redis is `Unavailable`
(`redis_outage`, the one mapping of Redis errors), and anything else is a
bug the SDK logs and answers with a generic message. The JSON shapes come
from `mcp_server.payloads`, as the routes' do.

Deliberate choices, so nobody "fixes" them:

- Results are built here rather than returned as models: the SDK would
  render a model's text content as indented JSON (a line per float); here it
  is compact JSON, the same data as the structured content, for clients that
  read only text. Floats are written in float32's shortest form (see
  `payloads.json_floats`), which nearly halves a reply full of vectors.
- `embed`, `similarity` and `search_job` check first that a worker is alive,
  so an agent hears "start a worker" at once instead of after the timeout.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, ParamSpec, TypeVar

import numpy as np
import orjson
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from mcp_server import tool_schemas as schema
from mcp_server.auth import caller_of
from mcp_server.job_updates import job_uri
from mcp_server.model_routes import model_object
from mcp_server.payloads import (
    hits_json,
    job_json,
    json_floats,
    matches_json,
    plain_row,
    results_json,
)
from mcp_server.tool_descriptions import DESCRIPTIONS
from pipeline import (
    DEFAULT_CHUNK_OVERLAP,
    InvalidInput,
    JobOptions,
    PayloadTooLarge,
    Pipeline,
    PipelineError,
    ProgressCallback,
    Settings,
    Unavailable,
    parse_item,
    parse_options,
)
from pipeline.jobs import (
    MAX_PAGE,
    Caller,
    Embeddings,
    JobStatus,
    check_encoding,
    check_idempotency_key,
)
from pipeline.store import redis_outage

P = ParamSpec("P")
T = TypeVar("T")

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
CREATES_JOB = ToolAnnotations(read_only_hint=False, destructive_hint=False,
                              idempotent_hint=False, open_world_hint=False)
CANCELS_JOB = ToolAnnotations(read_only_hint=False, destructive_hint=True,
                              idempotent_hint=True, open_world_hint=False)


def tool_errors(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Turn pipeline and Redis failures into MCP tool errors an agent can act on."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            with redis_outage():
                return await fn(*args, **kwargs)
        except PipelineError as error:
            raise ToolError(f"{error.code}: {error.message}") from error

    return call


def structured(data: Mapping[str, object]) -> CallToolResult:
    """A tool result carrying `data` as structured content and as compact JSON text."""
    text = orjson.dumps(data).decode()
    return CallToolResult(content=[TextContent(type="text", text=text)],
                          structured_content=dict(data))


class AgentTools:
    """The tools, bound to the process's settings and Pipeline."""

    def __init__(self, settings: Settings, pipeline: Pipeline) -> None:
        self.settings = settings
        self.pipeline = pipeline

    def register(self, mcp: MCPServer[Any]) -> None:
        """Add every tool to `mcp`."""
        tools: list[tuple[Callable[..., Any], str, ToolAnnotations]] = [
            (self.embed, "Embed texts", READ_ONLY),
            (self.similarity, "Rank texts by similarity", READ_ONLY),
            (self.submit_job, "Submit a bulk embedding job", CREATES_JOB),
            (self.job_status, "Job status", READ_ONLY),
            (self.job_results, "Job results", READ_ONLY),
            (self.search_job, "Search a job's inputs", READ_ONLY),
            (self.cancel_job, "Cancel a job", CANCELS_JOB),
            (self.list_models, "List the served models", READ_ONLY),
        ]
        limits = {"max_texts": self.settings.embed_max_texts,
                  "max_inputs": self.settings.max_inputs, "top_k_max": schema.TOP_K_MAX,
                  "page_max": MAX_PAGE, "page_default": schema.RESULTS_PAGE_DEFAULT}
        for fn, title, hints in tools:
            name = fn.__name__
            mcp.add_tool(fn, name=name, title=title, annotations=hints,
                         description=DESCRIPTIONS[name].format(**limits))

    @tool_errors
    async def embed(
        self, ctx: Context[Any, Any],
        inputs: Annotated[list[str], Field(description="The texts to embed, in order.")],
        normalize: schema.Normalize = True, dimensions: schema.Dimensions = None,
        truncate: schema.Truncate = True, model: schema.Model = None,
        encoding: schema.Encoding = "float", chunk: schema.Chunk = False,
        chunk_overlap: schema.ChunkOverlap = DEFAULT_CHUNK_OVERLAP,
        prompt: schema.Prompt = None, prompt_name: schema.PromptName = None,
        chunk_output: schema.ChunkOutput = None, chunking: schema.Chunking = None,
        chunk_tokens: schema.ChunkTokens = None, chunk_boundary: schema.ChunkBoundary = None,
    ) -> Annotated[CallToolResult, schema.Embeddings]:
        """Embed a few texts through the queue and return their vectors."""
        limit = self.settings.embed_max_texts
        if not inputs:
            raise InvalidInput("'inputs' is empty: give at least one text")
        if len(inputs) > limit:
            raise PayloadTooLarge(f"embed takes at most {limit} texts per call and got "
                                  f"{len(inputs)}; use submit_job for bulk work")
        items = [parse_item(text, i, max_chars=self.settings.max_text_chars)
                 for i, text in enumerate(inputs)]
        options = parse_options({"normalize": normalize, "dimensions": dimensions,
                                 "truncate": truncate, "model": model, "chunk": chunk,
                                 "chunk_overlap": chunk_overlap, "prompt": prompt,
                                 "prompt_name": prompt_name, "chunk_output": chunk_output,
                                 "chunking": chunking, "chunk_tokens": chunk_tokens,
                                 "chunk_boundary": chunk_boundary})
        pipeline = await self._pipeline_with_worker(options)
        progress = _progress_reporter(ctx)
        await progress(0, len(items))
        embedded = await pipeline.embed(items, options, caller=context_caller(ctx),
                                        on_progress=progress, encoding=encoding)
        return embed_reply(embedded, encoding, chunk)

    @tool_errors
    async def similarity(
        self, ctx: Context[Any, Any],
        query: schema.QueryText,
        candidates: Annotated[list[str], Field(description="The texts to rank.")],
        dimensions: schema.Dimensions = None, truncate: schema.Truncate = True,
        model: schema.Model = None, chunk: schema.Chunk = False,
        prompt: schema.Prompt = None, prompt_name: schema.PromptName = None,
    ) -> Annotated[CallToolResult, schema.Ranking]:
        """Rank candidates by cosine similarity to the query, best first."""
        limit = self.settings.embed_max_texts - 1
        if not candidates:
            raise InvalidInput("'candidates' is empty: give at least one text to rank")
        if len(candidates) > limit:
            raise PayloadTooLarge(f"similarity ranks at most {limit} candidates per call and "
                                  f"got {len(candidates)}; for a larger collection use "
                                  "submit_job, then search_job")
        _check_texts("query", [query], self.settings.max_text_chars)
        _check_texts("candidates", candidates, self.settings.max_text_chars)
        options = parse_options({"dimensions": dimensions, "truncate": truncate, "model": model,
                                 "chunk": chunk, "prompt": prompt, "prompt_name": prompt_name})
        pipeline = await self._pipeline_with_worker(options)
        progress = _progress_reporter(ctx)
        await progress(0, len(candidates) + 1)
        matches = await pipeline.similarity(query, candidates, options, caller=context_caller(ctx),
                                            on_progress=progress)
        return structured(matches_json(matches))

    @tool_errors
    async def submit_job(
        self, ctx: Context[Any, Any],
        inputs: schema.BulkInputs,
        normalize: schema.Normalize = True, dimensions: schema.Dimensions = None,
        truncate: schema.Truncate = True, model: schema.Model = None,
        idempotency_key: schema.IdempotencyKey = None, chunk: schema.Chunk = False,
        chunk_overlap: schema.ChunkOverlap = DEFAULT_CHUNK_OVERLAP,
        prompt: schema.Prompt = None, prompt_name: schema.PromptName = None,
        timeout_s: schema.TimeoutS = None,
        chunk_output: schema.ChunkOutput = None, chunking: schema.Chunking = None,
        chunk_tokens: schema.ChunkTokens = None, chunk_boundary: schema.ChunkBoundary = None,
    ) -> Annotated[CallToolResult, schema.JobHandle]:
        """Queue a bulk job and return its id at once."""
        check_idempotency_key(idempotency_key, "idempotency_key")
        max_chars = self.settings.max_text_chars
        items = [parse_item(raw, i, max_chars=max_chars) for i, raw in enumerate(inputs)]
        options = parse_options({"normalize": normalize, "dimensions": dimensions,
                                 "truncate": truncate, "model": model, "chunk": chunk,
                                 "chunk_overlap": chunk_overlap, "prompt": prompt,
                                 "prompt_name": prompt_name, "timeout_s": timeout_s,
                                 "chunk_output": chunk_output, "chunking": chunking,
                                 "chunk_tokens": chunk_tokens, "chunk_boundary": chunk_boundary})
        job = await self.pipeline.submit(items, options, caller=context_caller(ctx),
                                         idempotency_key=idempotency_key)
        return structured({"job_id": job.id, "total": job.total, "status": job.status.value,
                           "resource": job_uri(job.id)})

    @tool_errors
    async def job_status(
        self, ctx: Context[Any, Any], job_id: schema.JobId
    ) -> Annotated[CallToolResult, schema.JobStatus]:
        """A job's status and progress."""
        return structured(job_json(await self.pipeline.job(job_id, context_caller(ctx))))

    @tool_errors
    async def job_results(
        self, ctx: Context[Any, Any], job_id: schema.JobId, cursor: schema.Cursor = None,
        limit: schema.Limit = schema.RESULTS_PAGE_DEFAULT, encoding: schema.Encoding = "float",
    ) -> Annotated[CallToolResult, schema.ResultsPage]:
        """One page of a job's results, in input order."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be from 1 to {MAX_PAGE}, got {limit}")
        page = await self.pipeline.results(job_id, cursor or None, limit,
                                           check_encoding(encoding), caller=context_caller(ctx))
        return structured(results_json(page, plain=True))

    @tool_errors
    async def search_job(
        self, ctx: Context[Any, Any], job_id: schema.JobId, query: schema.QueryText,
        top_k: schema.TopK = 10,
    ) -> Annotated[CallToolResult, schema.SearchHits]:
        """The inputs of a completed job nearest to a query text."""
        if not 1 <= top_k <= schema.TOP_K_MAX:
            raise InvalidInput(f"top_k must be from 1 to {schema.TOP_K_MAX}, got {top_k}")
        _check_texts("query", [query], self.settings.max_text_chars)
        pipeline = self.pipeline
        if (await pipeline.job(job_id, context_caller(ctx))).status is JobStatus.COMPLETED:
            # Only then is a worker needed (for the query); search() explains other states.
            await self._require_worker(pipeline)
        hits = await pipeline.search(job_id, query, top_k, caller=context_caller(ctx))
        return structured(hits_json(hits))

    @tool_errors
    async def list_models(self) -> Annotated[CallToolResult, schema.ModelList]:
        """The models live workers serve, with their sizes and prompts."""
        models = await self.pipeline.models()
        return structured({"object": "list", "data": [model_object(m) for m in models]})

    @tool_errors
    async def cancel_job(
        self, ctx: Context[Any, Any], job_id: schema.JobId
    ) -> Annotated[CallToolResult, schema.JobStatus]:
        """Cancel a job; results already made stay readable."""
        return structured(job_json(await self.pipeline.cancel(job_id, context_caller(ctx))))

    async def _pipeline_with_worker(self, options: JobOptions) -> Pipeline:
        """The Pipeline, once the options suit the model and a worker is alive."""
        pipeline = self.pipeline
        await pipeline.model(options)
        await self._require_worker(pipeline)
        return pipeline

    @staticmethod
    async def _require_worker(pipeline: Pipeline) -> None:
        if not (await pipeline.ready()).workers:
            raise Unavailable("no worker is running, so nothing would embed these texts: start "
                              "`embedstream up` (or `embedstream worker`) against this Redis, "
                              "then retry")


def embed_reply(embedded: Embeddings, encoding: str, chunk: bool) -> CallToolResult:
    """What `embed` answers for texts embedded (also an `embed` task's result)."""
    values = _embeddings(embedded)
    text = encoding in ("base64", "float16")  # base64 strings, not numbers
    embeddings: list[Any] = values if text else json_floats(np.vstack(values))
    rows = embedded.rows
    reply: dict[str, object] = {
        "model": embedded.model, "dimensions": embedded.dimensions, "embeddings": embeddings,
        "truncated": [row["index"] for row in rows if row["truncated"]]}
    if chunk:
        reply["chunks"] = [plain_row(row).get("chunks", 1) for row in rows]
    if rows and "chunking" in rows[0]:
        reply["chunking"] = rows[0]["chunking"]
    return structured(reply)


def context_caller(ctx: Context[Any, Any]) -> Caller:
    """The caller the HTTP middleware put on the request (stdio's is trusted)."""
    scope = getattr(ctx.request_context.request, "scope", None)
    return caller_of(scope if isinstance(scope, dict) else None)


def _progress_reporter(ctx: Context[Any, Any]) -> ProgressCallback:
    """A progress callback that passes on increases only, so the client sees a rising count."""
    last = -1

    async def report(done: int, total: int) -> None:
        nonlocal last
        if done > last:
            last = done
            await ctx.report_progress(done, total, f"{done} of {total} texts embedded")

    return report


def _check_texts(field: str, texts: list[str], max_chars: int) -> None:
    for i, text in enumerate(texts):
        where = field if field == "query" else f"{field}[{i}]"
        if not text.strip():
            raise InvalidInput(f"{where} is empty or whitespace only; give it text")
        if len(text) > max_chars:
            raise InvalidInput(f"{where} has {len(text)} characters; the limit is {max_chars}")


def _embeddings(embedded: Embeddings) -> list[Any]:
    """The rows' embeddings in input order, or an error naming failed inputs."""
    rows = embedded.rows
    failed = [row for row in rows if row.get("embedding") is None]
    if failed:
        indexes = [row["index"] for row in failed]
        raise InvalidInput(f"inputs {indexes[:20]} could not be embedded: {failed[0].get('error')}",
                           indexes=indexes)
    if embedded.status is not JobStatus.COMPLETED or not rows:
        raise Unavailable(f"the embedding job ended {embedded.status.value} before every input "
                          "was embedded; retry")
    return [row["embedding"] for row in rows]
