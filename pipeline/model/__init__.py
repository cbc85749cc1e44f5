"""What a model is and how it runs: its description, tokens, prompts, windows, and the backends."""


from pipeline.model.embedder import Embedded, Embedder, backend_of, shape_vectors
from pipeline.model.info import ModelInfo
from pipeline.model.loading import load_embedder
from pipeline.model.windows import Plan, plan_texts

__all__ = [
    "Embedded",
    "Embedder",
    "ModelInfo",
    "Plan",
    "backend_of",
    "load_embedder",
    "plan_texts",
    "shape_vectors",
]
