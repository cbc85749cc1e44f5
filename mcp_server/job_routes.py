"""REST endpoints for jobs: submit (JSON or NDJSON), list, status, results, inputs, cancel.

Every read and the cancel go through the `Pipeline` with the request's caller, so
another tenant's job answers 404 as if it did not exist.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mcp_server.json_lists import TooMany
from mcp_server.payloads import (
    inputs_json,
    is_ndjson,
    job_json,
    job_page_json,
    json_object,
    ndjson_values,
    parsed_inputs,
    pipeline_of,
    query_encoding,
    query_int,
    request_caller,
    results_json,
    settings_of,
    too_many_inputs,
)
from mcp_server.responses import json_response
from pipeline import InvalidInput, Item, parse_item, parse_options, parse_query_options, tracing
from pipeline.jobs import MAX_LIMIT, MAX_PAGE, check_idempotency_key, check_job_id


def _links(request: Request, job_id: str) -> dict[str, str]:
    base = f"/v1/jobs/{job_id}"
    return {"self": base, "events": f"{base}/events", "results": f"{base}/results"}


@tracing.continues
async def create_job(request: Request) -> Response:
    """POST /v1/jobs: queue a job; 202 with its id and links."""
    pipeline = pipeline_of(request)
    max_chars = settings_of(request).max_text_chars
    key = check_idempotency_key(request.headers.get("idempotency-key"))
    if is_ndjson(request):
        options = parse_query_options(dict(request.query_params))
        writer = await pipeline.writer(options, request_caller(request))

        async def items() -> AsyncIterator[Item]:
            # Blank lines are skipped, so an input's index is its count of
            # inputs before it, not its line number; errors name both.
            index = 0
            async for line_no, value in ndjson_values(request):
                try:
                    item = parse_item(value, index, max_chars=max_chars)
                except InvalidInput as exc:
                    raise InvalidInput(f"line {line_no}: {exc.message}", line=line_no,
                                       **exc.detail) from None
                index += 1
                yield item

        job = await pipeline.commit(writer, items(), key)
    else:
        settings = settings_of(request)
        try:
            body = await json_object(request, "inputs", settings.max_inputs)
        except TooMany:
            raise too_many_inputs(settings) from None
        if "input" in body.fields and not body.listed:  # the OpenAI field, sent by habit
            raise InvalidInput("POST /v1/jobs takes 'inputs' (a list of strings or {id, text, "
                               "metadata} objects), not 'input'; 'input' is the field of "
                               "POST /v1/embeddings")
        options = parse_options({k: v for k, v in body.fields.items() if k != "inputs"})
        inputs = parsed_inputs(body, settings)
        del body  # `inputs` decodes each input as the writer takes it
        job = await pipeline.submit(inputs, options, caller=request_caller(request),
                                    idempotency_key=key)
    links = _links(request, job.id)
    reply = {"id": job.id, "status": job.status.value, "total": job.total, "links": links}
    return json_response(reply, 202, headers={"Location": links["self"]})


async def list_jobs(request: Request) -> Response:
    """GET /v1/jobs: the caller's jobs, newest first (every job for an admin key)."""
    limit = query_int(request, "limit", 50, 1, MAX_LIMIT)
    page = await pipeline_of(request).list_jobs(
        request_caller(request), limit=limit, cursor=request.query_params.get("cursor"),
        status=request.query_params.get("status"))
    return json_response(job_page_json(page))


async def get_job(request: Request) -> Response:
    """GET /v1/jobs/{id}: status and counters."""
    return json_response(job_json(await pipeline_of(request).job(
        request.path_params["job_id"], request_caller(request))))


async def get_results(request: Request) -> Response:
    """GET /v1/jobs/{id}/results: one page in index order."""
    job_id = check_job_id(request.path_params["job_id"])
    limit = query_int(request, "limit", 100, 1, MAX_PAGE)
    page = await pipeline_of(request).results(
        job_id, request.query_params.get("cursor"), limit, query_encoding(request),
        caller=request_caller(request))
    return json_response(results_json(page))


async def get_inputs(request: Request) -> Response:
    """GET /v1/jobs/{id}/inputs: one page of the inputs as submitted, in index order."""
    job_id = check_job_id(request.path_params["job_id"])
    limit = query_int(request, "limit", 100, 1, MAX_PAGE)
    page = await pipeline_of(request).inputs(
        job_id, request.query_params.get("cursor"), limit, caller=request_caller(request))
    return json_response(inputs_json(page))


async def delete_job(request: Request) -> Response:
    """DELETE /v1/jobs/{id}: cancel; made results stay readable."""
    return json_response(job_json(await pipeline_of(request).cancel(
        request.path_params["job_id"], request_caller(request))))


routes = [
    Route("/v1/jobs", create_job, methods=["POST"]),
    Route("/v1/jobs", list_jobs, methods=["GET"]),
    Route("/v1/jobs/{job_id}", get_job, methods=["GET"]),
    Route("/v1/jobs/{job_id}", delete_job, methods=["DELETE"]),
    Route("/v1/jobs/{job_id}/results", get_results, methods=["GET"]),
    Route("/v1/jobs/{job_id}/inputs", get_inputs, methods=["GET"]),
]
