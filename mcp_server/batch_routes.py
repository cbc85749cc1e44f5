"""OpenAI's Files and Batch APIs, for `/v1/embeddings` batches: `/v1/files`, `/v1/batches`.

The shapes are OpenAI's (the File object, the Batch object with
`request_counts` and `errors`, cursor lists with `first_id`, `last_id` and
`has_more`), so the official `openai` client works unchanged; a batch is one
of our jobs (`pipeline.jobs.batches`). Every read goes through the request's
caller, so another key's batch or file answers 404 as if it did not exist.

An upload is multipart (the only route that takes it, see `BodyGuard`):
Starlette's parser spools the file to disk past 1 MiB, and it is copied into
Redis a part at a time, so a 20 MB upload never sits whole in memory.
Output and error files are made from the job's results as they are read,
and streamed.

The `Files` and `Batches` of a process are made on first use and kept on
`app.state`: their scripts are registered once per Redis client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from mcp_server.embeddings import data_item
from mcp_server.payloads import json_body, pipeline_of, query_int, request_caller, settings_of
from mcp_server.responses import json_response
from pipeline import InvalidRequest, NotFound, PipelineError
from pipeline.jobs import (
    OUTPUT_FILE_ID,
    PART_BYTES,
    WINDOW_S,
    Batches,
    BatchState,
    RequestOutcome,
    StoredFile,
    check_cancellable,
    check_create,
    check_metadata,
    check_purpose,
    option_error,
)

BATCH_FIELDS = ("input_file_id", "endpoint", "completion_window", "metadata",
                "output_expires_after")
STREAM_CHUNK_BYTES = 64 * 1024


def batches_of(request: Request) -> Batches:
    """The process's Batches (its Files with it), made on first use."""
    state = request.app.state
    if getattr(state, "batches", None) is None:
        pipeline = pipeline_of(request)
        state.batches = Batches(pipeline.redis, pipeline.keys, settings_of(request))
    batches: Batches = state.batches
    return batches


def file_json(stored: StoredFile) -> dict[str, object]:
    """OpenAI's File object."""
    return {"id": stored.id, "object": "file", "bytes": stored.bytes,
            "created_at": stored.created_at, "filename": stored.filename,
            "purpose": stored.purpose, "status": "processed", "expires_at": stored.expires_at,
            "status_details": None}


def batch_json(state: BatchState) -> dict[str, object]:
    """OpenAI's Batch object."""
    record, times = state.record, state.times
    errors = [{k: v for k, v in e.__dict__.items()} for e in state.errors]
    return {
        "id": record.id, "object": "batch", "endpoint": record.endpoint,
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": record.input_file_id, "completion_window": record.completion_window,
        "status": state.status, "output_file_id": state.output_file_id,
        "error_file_id": state.error_file_id, "created_at": record.created_at,
        "expires_at": record.created_at + WINDOW_S,
        **{name: times.get(name) for name in (
            "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
            "cancelling_at", "cancelled_at")},
        "request_counts": {"total": state.counts.total, "completed": state.counts.completed,
                           "failed": state.counts.failed},
        "metadata": record.metadata, "model": state.model,
    }


def list_json(data: list[dict[str, Any]], has_more: bool) -> dict[str, object]:
    """OpenAI's cursor page."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


async def _upload_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while data := await upload.read(PART_BYTES):
        yield data


async def create_file(request: Request) -> Response:
    """POST /v1/files: a multipart upload (`file`, `purpose=batch`), stored a part at a time."""
    async with request.form(max_files=1, max_fields=16) as form:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("send the file as the multipart/form-data field 'file'")
        stored = await batches_of(request).files.upload(
            request_caller(request).owner, upload.filename or "file", check_purpose(purpose),
            _upload_chunks(upload))
    return json_response(file_json(stored))


async def list_files(request: Request) -> Response:
    """GET /v1/files: the caller's uploaded files, newest first unless `order=asc`."""
    order = request.query_params.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise InvalidRequest("query parameter 'order' must be asc or desc")
    page = await batches_of(request).files.list(
        request_caller(request), after=request.query_params.get("after"),
        limit=query_int(request, "limit", 10_000, 1, 10_000), order=order,
        purpose=request.query_params.get("purpose"))
    return json_response(list_json([file_json(f) for f in page.files], page.has_more))


async def get_file(request: Request) -> Response:
    """GET /v1/files/{id}: an uploaded file, or a finished batch's output or error file."""
    file_id = request.path_params["file_id"]
    if OUTPUT_FILE_ID.fullmatch(file_id):
        return json_response(file_json(await _output_file(request, file_id)))
    return json_response(file_json(await batches_of(request).files.get(
        file_id, request_caller(request))))


async def delete_file(request: Request) -> Response:
    """DELETE /v1/files/{id}: an uploaded file (a batch made from it runs on), or an output."""
    file_id = request.path_params["file_id"]
    batches = batches_of(request)
    if OUTPUT_FILE_ID.fullmatch(file_id):
        state = await _output_state(request, file_id)
        await batches.forget_file(state.record, _which(file_id))
    else:
        await batches.files.delete(file_id, request_caller(request))
    return json_response({"id": file_id, "object": "file", "deleted": True})


async def file_content(request: Request) -> Response:
    """GET /v1/files/{id}/content: the bytes as uploaded, or output lines made as they are read."""
    file_id = request.path_params["file_id"]
    batches = batches_of(request)
    if OUTPUT_FILE_ID.fullmatch(file_id):
        state = await _output_state(request, file_id)
        body = _chunked(await _output_lines(request, state, _which(file_id)))
        return StreamingResponse(body, media_type="application/jsonl")
    stored = await batches.files.get(file_id, request_caller(request))
    return StreamingResponse(batches.files.parts(stored), media_type="application/octet-stream",
                             headers={"Content-Length": str(stored.bytes)})


def _which(file_id: str) -> str:
    match = OUTPUT_FILE_ID.fullmatch(file_id)
    assert match is not None
    return match.group(2)


async def _output_state(request: Request, file_id: str) -> BatchState:
    """The finished batch that names `file_id` as its output or error file, else NotFound."""
    match = OUTPUT_FILE_ID.fullmatch(file_id)
    assert match is not None
    batches = batches_of(request)
    state = await batches.state(await batches.get(f"batch_{match.group(1)}",
                                                  request_caller(request)))
    if file_id not in (state.output_file_id, state.error_file_id):
        raise NotFound(f"file {file_id!r} does not exist (yet, or any more)")
    return state


async def _output_file(request: Request, file_id: str) -> StoredFile:
    """An output or error file's description; its size is counted once, then kept."""
    state = await _output_state(request, file_id)
    which = _which(file_id)
    size = state.record.sizes.get(which)
    if size is None:
        size = 0
        async for line in await _output_lines(request, state, which):
            size += len(line)
        await batches_of(request).keep_size(state.record, which, size)
    finished = state.times.get("completed_at") or state.times.get("cancelled_at") or \
        state.times.get("expired_at") or state.record.created_at
    return StoredFile(file_id, state.record.owner, f"{state.record.id}_{which}.jsonl",
                      "batch_output", size, 0, finished, state.record.created_at + WINDOW_S)


async def _output_lines(request: Request, state: BatchState, which: str
                        ) -> AsyncIterator[bytes]:
    """The lines of a batch's output (`which="output"`) or error file, made as they are read."""
    batches = batches_of(request)
    job = await batches.job(state.record)
    if job is None:
        raise NotFound(f"the results of batch {state.record.id} have expired")
    view = await pipeline_of(request).view(job.id, state.record.encoding,
                                           request_caller(request))
    tokens_per_input = job.tokens / max(job.done, 1)
    unrun = "batch_cancelled" if state.status == "cancelled" else "batch_expired"

    async def lines() -> AsyncIterator[bytes]:
        async for outcome in batches.outcomes(state.record, job, view):
            ok = outcome.error is None and not outcome.missing
            if ok != (which == "output"):
                continue
            line = (_success(state, outcome, tokens_per_input) if ok
                    else _failure(state, outcome, unrun))
            yield orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"

    return lines()


def _ids(state: BatchState, outcome: RequestOutcome) -> dict[str, str]:
    number = outcome.number
    return {"id": f"batch_req_{state.record.hex}_{number}", "custom_id": outcome.custom_id}


def _success(state: BatchState, outcome: RequestOutcome, tokens_per_input: float
             ) -> dict[str, object]:
    """An output line: the /v1/embeddings response this request would have had (with
    `chunk_output: "chunks"`, each item's `chunks` and `chunking` too)."""
    tokens = round(tokens_per_input * len(outcome.rows))
    data = [{**data_item(row), "index": i} for i, row in enumerate(outcome.rows)]
    body = {"object": "list", "data": data, "model": state.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
    return {**_ids(state, outcome), "error": None, "response": {
        "status_code": 200, "request_id": f"{state.record.hex}-{outcome.number}", "body": body}}


def _failure(state: BatchState, outcome: RequestOutcome, unrun: str) -> dict[str, object]:
    """An error line: the 422 /v1/embeddings would have answered, or why it never ran."""
    if outcome.error is None:
        reason = ("the batch was cancelled before this request ran" if unrun ==
                  "batch_cancelled" else "this request did not run before the batch expired")
        return {**_ids(state, outcome), "response": None,
                "error": {"code": unrun, "message": reason}}
    index = next(i for i, row in enumerate(outcome.rows) if "error" in row)
    error = {"code": "invalid_input",
             "message": f"input {index} could not be embedded: {outcome.error}"}
    return {**_ids(state, outcome), "error": None, "response": {
        "status_code": 422, "request_id": f"{state.record.hex}-{outcome.number}",
        "body": {"error": error}}}


async def _chunked(lines: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Lines joined into writes of about `STREAM_CHUNK_BYTES`."""
    buffer = bytearray()
    async for line in lines:
        buffer += line
        if len(buffer) >= STREAM_CHUNK_BYTES:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


async def create_batch(request: Request) -> Response:
    """POST /v1/batches: check the input file, then queue its requests as one job."""
    fields = await json_body(request)
    unknown = sorted(set(fields) - set(BATCH_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(unknown)}")
    check_create(fields.get("endpoint"), fields.get("completion_window"))
    metadata = check_metadata(fields.get("metadata"))
    caller, batches, pipeline = request_caller(request), batches_of(request), pipeline_of(request)
    stored = await batches.files.get(str(fields.get("input_file_id")), caller)
    if stored.purpose != "batch":
        raise InvalidRequest(f"file {stored.id} was not uploaded with purpose 'batch'")
    record = await batches.open(caller.owner, stored, metadata)
    validation = await batches.validate(record, stored)
    if validation.errors:
        return json_response(batch_json(await batches.state(
            await batches.fail(record, validation.errors))))
    try:
        writer = await pipeline.writer(validation.options, caller)
    except InvalidRequest as exc:  # the model or an option the file names: the file's fault
        failed = await batches.fail(record, [option_error(exc, validation.first_line)])
        return json_response(batch_json(await batches.state(failed)))
    record = await batches.bind(record, validation, writer.job_id)
    try:
        await pipeline.commit(writer, batches.items(record, stored))
    except PipelineError:  # refused now (a quota, backpressure): the client may retry
        await batches.discard(record)
        raise
    return json_response(batch_json(await batches.state(await batches.submitted(record))))


async def list_batches(request: Request) -> Response:
    """GET /v1/batches: the caller's batches, newest first."""
    page = await batches_of(request).list(
        request_caller(request), after=request.query_params.get("after"),
        limit=query_int(request, "limit", 20, 1, 100))
    return json_response(list_json([batch_json(s) for s in page.batches], page.has_more))


async def get_batch(request: Request) -> Response:
    """GET /v1/batches/{id}: the batch, its status derived from its job."""
    batches = batches_of(request)
    return json_response(batch_json(await batches.state(await batches.get(
        request.path_params["batch_id"], request_caller(request)))))


async def cancel_batch(request: Request) -> Response:
    """POST /v1/batches/{id}/cancel: cancel its job; results made so far stay readable."""
    batches, caller = batches_of(request), request_caller(request)
    record = await batches.get(request.path_params["batch_id"], caller)
    check_cancellable(await batches.state(record))
    if await batches.job(record) is not None:
        await pipeline_of(request).cancel(record.job, caller)
    return json_response(batch_json(await batches.state(record)))


routes = [
    Route("/v1/files", create_file, methods=["POST"]),
    Route("/v1/files", list_files, methods=["GET"]),
    Route("/v1/files/{file_id}", get_file, methods=["GET"]),
    Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
    Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
    Route("/v1/batches", create_batch, methods=["POST"]),
    Route("/v1/batches", list_batches, methods=["GET"]),
    Route("/v1/batches/{batch_id}", get_batch, methods=["GET"]),
    Route("/v1/batches/{batch_id}/cancel", cancel_batch, methods=["POST"]),
]
