"""Loading the embedder `EMBEDSTREAM_BACKEND` names.

`auto` (the default: the fastest backend whose vectors are torch's, measured
once per machine, see `pipeline.model.choice`), `onnx` (ONNX Runtime fp32,
see `pipeline.model.onnx_backend`), `onnx-int8`, `openvino`,
`openvino-bf16`, `openvino-f32`, `torch` (sentence-transformers as it is), or
`package.module:Factory`, a callable taking `Settings` and returning an
Embedder; tests use that to plug in an embedder they control. A model that
cannot run on ONNX falls back to torch, and says so in the log;
`backend_of(embedder)` is what a job records as the backend it ran on.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import subprocess
from typing import TYPE_CHECKING

from pipeline.errors import UnknownModel
from pipeline.model.files import ExportFailed
from pipeline.model.onnx_backend import OnnxEmbedder
from pipeline.model.torch_backend import SentenceTransformerEmbedder

if TYPE_CHECKING:
    from pipeline.model.embedder import Embedder
    from pipeline.settings import Settings

logger = logging.getLogger(__name__)

ONNX_GRAPH_BACKENDS = ("onnx", "onnx-int8", "openvino", "openvino-bf16", "openvino-f32")


def load_embedder(settings: Settings) -> Embedder:
    """Build the embedder named by `settings.backend`."""
    backend = settings.backend
    if backend == "auto":
        return _chosen(settings)
    if backend == "torch":
        return SentenceTransformerEmbedder(settings)
    if backend in ONNX_GRAPH_BACKENDS:
        try:
            return _graph_embedder(settings, backend)
        except (ExportFailed, OSError, subprocess.SubprocessError) as exc:
            logger.warning("model %s cannot run on the %s backend (%s); falling back to torch",
                           settings.model, backend, exc)
            return SentenceTransformerEmbedder(settings)
    if ":" in backend:
        module_name, _, attr = backend.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        embedder: Embedder = factory(settings)
        return embedder
    raise UnknownModel(f"unknown backend {backend!r}; use auto, "
                       f"{', '.join(ONNX_GRAPH_BACKENDS)}, 'torch' or 'module:Factory'")


def _chosen(settings: Settings) -> Embedder:
    """The embedder `auto` picks, its info carrying why (as /v1/models shows it)."""
    from pipeline.model.choice import choose_backend

    choice = choose_backend(settings)
    embedder = load_embedder(settings.replace(backend=choice.backend))
    embedder.info = dataclasses.replace(embedder.info, backend_reason=choice.reason)
    return embedder


def _graph_embedder(settings: Settings, backend: str) -> Embedder:
    """An embedder running our exported ONNX graph: ONNX Runtime or OpenVINO."""
    if not backend.startswith("openvino"):
        return OnnxEmbedder(settings, quantized=backend == "onnx-int8")
    try:
        from pipeline.model.openvino_backend import OpenVinoEmbedder
    except ImportError as exc:
        raise UnknownModel(f"backend {backend!r} needs the openvino package: "
                           "pip install openvino") from exc
    _, _, precision = backend.partition("-")
    return OpenVinoEmbedder(settings, precision or None)
