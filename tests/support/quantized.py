"""Reference quantizations for the precision tests: what sentence-transformers computes."""

from __future__ import annotations

from typing import Any

import numpy as np
from sentence_transformers.util import quantize_embeddings

from pipeline.jobs.quantize import calibration_texts
from pipeline.model.embedder import shape_vectors
from tests.support.fakes import raw_vector

DIMS = 384

QUANTIZED = ["int8", "uint8", "binary", "ubinary"]


SENTENCES = ["a cat sits on the mat", "dogs bark at night", "the stock market fell",
             "rain is expected tomorrow", "a man plays the guitar"]


def recorded_ranges(dimensions: int | None = None, normalize: bool = True) -> Any:
    """The int8 ranges of the recorded calibration, computed here from the fake's vectors."""
    calibration = np.vstack([raw_vector(text, DIMS) for text in calibration_texts()])
    shaped = shape_vectors(calibration, dimensions, normalize)
    return np.vstack([shaped.min(axis=0), shaped.max(axis=0)])


def reference(floats: Any, encoding: str, dimensions: int | None = None) -> list[list[int]]:
    """What sentence-transformers' quantize_embeddings makes of the float vectors."""
    matrix = np.asarray(floats, dtype=np.float32)
    ranges = recorded_ranges(dimensions) if encoding.endswith("int8") else None
    quantized: Any = quantize_embeddings(matrix, encoding, ranges=ranges)
    return [list(map(int, row)) for row in quantized]
