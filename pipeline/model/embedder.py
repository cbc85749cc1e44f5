"""Turning texts into vectors: the Embedder protocol every backend implements.

A backend returns raw model output plus each text's token count (special
tokens included, before truncation), so the worker can flag `truncated`
inputs and report token usage without tokenizing twice in Python. The
backends are `pipeline.model.torch_backend` and `pipeline.model.onnx_backend`;
`pipeline.model.loading` picks one. Both also offer `embed_tokens` (each
text's token embeddings and their characters, `pipeline.model.spans`) for
late chunking; an embedder without it fails late-chunked inputs, saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pipeline.model.info import ModelInfo


@dataclass(frozen=True)
class Embedded:
    """Vectors (float32, one row a text) and token counts for a batch of texts."""

    vectors: np.ndarray[Any, np.dtype[np.float32]]
    token_counts: np.ndarray[Any, np.dtype[np.int64]]


class Embedder(Protocol):
    """Anything that embeds a batch of texts with one model."""

    info: ModelInfo

    def embed(self, texts: Sequence[str]) -> Embedded: ...


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


def backend_of(embedder: Embedder) -> str:
    """The backend an embedder runs on, as jobs record it ("" when it does not say)."""
    return embedder.info.backend
