"""Turning texts into vectors: the Embedder protocol and its backends.

A backend returns raw model output plus each text's token count (special
tokens included, before truncation), so the worker can flag `truncated`
inputs and report token usage without tokenizing twice in Python.

`EMBEDSTREAM_BACKEND` picks the backend: `onnx` (the default: ONNX Runtime,
see `pipeline.onnx_backend`), `onnx-int8`, `torch` (sentence-transformers as
it is), or `package.module:Factory`, a callable taking `Settings` and
returning an Embedder; tests use that to plug in an embedder they control.
A model that cannot run on ONNX falls back to torch, and says so in the log;
`backend_of(embedder)` is what a job records as the backend it ran on.
"""

from __future__ import annotations

import importlib
import logging
import subprocess
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from pipeline.errors import UnknownModel
from pipeline.models import ModelInfo, canonical_model_name, model_source
from pipeline.runtime import check_dtype, compute_threads, torch_device

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pipeline.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedded:
    """Vectors (float32, one row a text) and token counts for a batch of texts."""

    vectors: np.ndarray[Any, np.dtype[np.float32]]
    token_counts: np.ndarray[Any, np.dtype[np.int64]]


class Embedder(Protocol):
    """Anything that embeds a batch of texts with one model."""

    info: ModelInfo

    def embed(self, texts: Sequence[str]) -> Embedded: ...


class SentenceTransformerEmbedder:
    """The `torch` backend: sentence-transformers' own encode()."""

    def __init__(self, settings: Settings, batch_size: int = 32) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        name = canonical_model_name(settings.model)
        device = torch_device(settings.device)
        torch.set_num_threads(compute_threads())
        started = time.perf_counter()
        try:
            self.model = SentenceTransformer(model_source(name), device=device)
        except OSError as exc:
            raise UnknownModel(f"cannot load model {name!r}: {exc}") from exc
        if check_dtype(settings.dtype) == "float16" and device.startswith("cuda"):
            self.model.half()  # opt-in: fp16 on a GPU; on a CPU it is slower, so not there
        self.revision = _revision(name)
        get_dimension = (getattr(self.model, "get_embedding_dimension", None)
                         or self.model.get_sentence_embedding_dimension)
        dimensions = get_dimension() or 0
        max_seq = int(self.model.max_seq_length or 512)
        prompts = {str(k): str(v) for k, v in (self.model.prompts or {}).items()}
        self.info = ModelInfo(name, int(dimensions), max_seq, prompts,
                              self.model.default_prompt_name or None, "torch")
        self.batch_size = batch_size
        self._tokenizer = _counting_tokenizer(self.model.tokenizer)
        logger.info(
            "loaded model %s (%d dims, %d tokens max) on %s in %.1fs",
            name, dimensions, max_seq, self.model.device, time.perf_counter() - started,
        )

    def embed(self, texts: Sequence[str]) -> Embedded:
        """Embed texts as given; rows keep the order of `texts`.

        What `encode()` does for one batch, without its per-call overhead: the
        worker already hands over length-sorted calls of a few texts. Features
        come from the model's own `preprocess` and go through the model's
        modules (pooling and normalization included), so the vectors are
        encode()'s. The job's prompt is already in the texts (the worker
        prepends it), so no prompt is added here. Token counts come from the
        attention mask; only texts cut at the model's limit are tokenized
        again, untruncated, for their true count.
        """
        import torch
        from sentence_transformers.util import batch_to_device

        batch = list(texts)
        parts = [np.empty((0, self.info.dimensions), dtype=np.float32)]
        counts = np.zeros(len(batch), dtype=np.int64)
        with torch.inference_mode():
            for start in range(0, len(batch), self.batch_size):
                part = batch[start:start + self.batch_size]
                features = batch_to_device(self.model.preprocess(part), self.model.device)
                out = self.model(features)["sentence_embedding"]
                parts.append(out.float().cpu().numpy())
                mask = features.get("attention_mask")
                if mask is not None:
                    counts[start:start + len(part)] = mask.sum(dim=1).cpu().numpy()
        at_limit = [i for i, n in enumerate(counts) if n >= self.info.max_seq_length or n == 0]
        if at_limit:
            counts[at_limit] = self._count_tokens([batch[i] for i in at_limit])
        return Embedded(np.concatenate(parts).astype(np.float32, copy=False), counts)

    def _count_tokens(self, texts: Sequence[str]) -> np.ndarray[Any, np.dtype[np.int64]]:
        if self._tokenizer is None:
            return np.zeros(len(texts), dtype=np.int64)
        encodings = self._tokenizer.encode_batch(list(texts))
        return np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(texts))


def _counting_tokenizer(tokenizer: Any) -> Any:
    """A copy of the fast tokenizer that neither truncates nor pads, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def shape_vectors(
    vectors: np.ndarray[Any, np.dtype[np.float32]], dimensions: int | None, normalize: bool
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Apply Matryoshka truncation to `dimensions`, then L2-normalize if asked."""
    out = vectors[:, :dimensions] if dimensions else vectors
    if normalize or dimensions:
        # A truncated vector is renormalized whatever `normalize` says: its
        # norm is meaningless, and every Matryoshka reference does this.
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(out, dtype=np.float32)


def _revision(name: str) -> str | None:
    """A hash of the model's local files (None when they are not local: no cache then)."""
    from pipeline.onnx_backend import ExportFailed, model_folder, model_revision

    try:
        return model_revision(model_folder(name))
    except (ExportFailed, OSError):
        return None


def backend_of(embedder: Embedder) -> str:
    """The backend an embedder runs on, as jobs record it ("" when it does not say)."""
    return embedder.info.backend


def load_embedder(settings: Settings) -> Embedder:
    """Build the embedder named by `settings.backend`."""
    backend = settings.backend
    if backend == "torch":
        return SentenceTransformerEmbedder(settings)
    if backend in ("onnx", "onnx-int8"):
        from pipeline.onnx_backend import ExportFailed, OnnxEmbedder

        try:
            return OnnxEmbedder(settings, quantized=backend == "onnx-int8")
        except (ExportFailed, OSError, subprocess.SubprocessError) as exc:
            logger.warning("model %s cannot run on the %s backend (%s); falling back to torch",
                           settings.model, backend, exc)
            return SentenceTransformerEmbedder(settings)
    if ":" in backend:
        module_name, _, attr = backend.partition(":")
        factory = getattr(importlib.import_module(module_name), attr)
        embedder: Embedder = factory(settings)
        return embedder
    raise UnknownModel(f"unknown backend {backend!r}; use 'onnx', 'onnx-int8', 'torch' "
                       "or 'module:Factory'")
