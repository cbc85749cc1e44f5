"""What a model is and how it runs: its description, tokens, prompts, windows, and the backends."""


from pipeline.model.embedder import Embedded, Embedder, backend_of, shape_vectors
from pipeline.model.info import ModelInfo
from pipeline.model.loading import load_embedder
from pipeline.model.spans import ChunkSpec, TokenEmbeddings, plan_chunks, pool_late, window_texts
from pipeline.model.windows import Plan, plan_texts

__all__ = [
    "ChunkSpec",
    "Embedded",
    "Embedder",
    "ModelInfo",
    "Plan",
    "TokenEmbeddings",
    "backend_of",
    "load_embedder",
    "plan_chunks",
    "plan_texts",
    "pool_late",
    "shape_vectors",
    "window_texts",
]
