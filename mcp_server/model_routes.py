"""GET /v1/models: the models live workers serve, in the OpenAI list shape."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mcp_server.payloads import pipeline_of
from mcp_server.responses import json_response
from pipeline.model import ModelInfo


def model_object(model: ModelInfo) -> dict[str, object]:
    """One model as /v1/models and the MCP `list_models` tool show it."""
    return {"id": model.name, "object": "model", "owned_by": "embedstream",
            "dimensions": model.dimensions, "max_tokens": model.max_seq_length,
            "backend": model.backend or None, "backend_reason": model.backend_reason or None,
            "prompts": model.prompts}


async def list_models(request: Request) -> Response:
    """The served models; a model appears while at least one live worker serves it."""
    models = await pipeline_of(request).models()
    return json_response({"object": "list", "data": [model_object(m) for m in models]})


routes = [Route("/v1/models", list_models, methods=["GET"])]
