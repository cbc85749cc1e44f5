"""POST /v1/embeddings, compatible with the OpenAI API, answered through the queue.

The official OpenAI client asks for `encoding_format="base64"` unless told
otherwise, so base64 (little-endian float32) is first-class. Token arrays as
`input` are not supported: send text. Beyond OpenAI's fields, embedstream's
job options (`chunk`, `chunk_overlap`, `chunk_output`, `chunking`,
`chunk_tokens`, `chunk_boundary`, `prompt`, `prompt_name`, `normalize`,
`truncate`) are accepted as extra fields (the client's `extra_body`), and
`encoding_format` also takes `float16` (base64 of little-endian half floats), `int8`,
`uint8`, `binary` and `ubinary`.

A client that hangs up stops its request at once (`mcp_server.disconnects`):
its reply is waited for no more, and a job made for it is cancelled.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mcp_server.disconnects import CLIENT_CLOSED_REQUEST, ClientGone, unless_disconnected
from mcp_server.json_lists import JsonObject, TooMany
from mcp_server.payloads import json_object, pipeline_of, request_caller, settings_of
from mcp_server.responses import json_response
from pipeline import InvalidInput, Item, PayloadTooLarge, parse_item, parse_options, tracing
from pipeline.jobs import ResultRow, check_encoding

OPENAI_FIELDS = ("input", "model", "encoding_format", "dimensions", "user")
EXTRA_FIELDS = ("normalize", "truncate", "chunk", "chunk_overlap", "chunk_output", "chunking",
                "chunk_tokens", "chunk_boundary", "prompt", "prompt_name")


def _inputs(body: JsonObject, max_chars: int) -> list[Item]:
    raw = body.fields.get("input")
    if isinstance(raw, str):
        return [parse_item(raw, 0, max_chars=max_chars)]
    if not body.listed or not body.count:
        raise InvalidInput("'input' must be a string or a non-empty list of strings")
    texts = list(body.elements())
    if not all(isinstance(x, str) for x in texts):
        raise InvalidInput("'input' items must be strings (token arrays are not supported)")
    return [parse_item(text, i, max_chars=max_chars) for i, text in enumerate(texts)]


@tracing.continues
async def create_embeddings(request: Request) -> Response:
    """Embed `input` and answer in the OpenAI shape, with token usage."""
    settings = settings_of(request)
    limit = settings.embed_max_texts * 4
    try:
        body = await json_object(request, "input", limit)
    except TooMany:
        raise PayloadTooLarge(f"'input' has more than {limit} items; the limit is {limit}. "
                              "Use POST /v1/jobs for bulk work") from None
    fields = body.fields
    unknown = sorted(set(fields) - set(OPENAI_FIELDS) - set(EXTRA_FIELDS))
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)}")
    encoding = check_encoding(fields.get("encoding_format") or None, "'encoding_format'",
                              error=InvalidInput)
    items = _inputs(body, settings.max_text_chars)
    options = parse_options({name: fields.get(name)
                             for name in ("model", "dimensions", *EXTRA_FIELDS)})
    pipeline = pipeline_of(request)
    try:
        embedded = await unless_disconnected(request, pipeline.embed(
            items, options, caller=request_caller(request), encoding=encoding))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody is there to read it
    rows = embedded.rows
    failed = [row for row in rows if row.get("embedding") is None]
    if failed:
        raise InvalidInput(f"input {failed[0]['index']} could not be embedded: "
                           f"{failed[0].get('error')}")
    data = [data_item(row) for row in rows]
    tokens = embedded.tokens
    return json_response({"object": "list", "data": data, "model": embedded.model,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


def data_item(row: ResultRow) -> dict[str, Any]:
    """One `data` item; with `chunk_output: "chunks"` also its `chunks` and `chunking`."""
    item: dict[str, Any] = {"object": "embedding", "index": row["index"],
                            "embedding": row["embedding"]}
    if isinstance(row.get("chunks"), list):
        item["chunks"], item["chunking"] = row["chunks"], row.get("chunking")
    return item


routes = [Route("/v1/embeddings", create_embeddings, methods=["POST"])]
