"""Every backend's vectors pinned to sentence-transformers' own, over STS-B dev sentences.

The bounds sit just under what each backend measured on 400 dev sentences
(min cosine to torch: onnx and openvino-f32 0.9999999, openvino-bf16
0.99997; onnx-int8 mean 0.994, min 0.990), so a backend that drifts (a
changed export, a runtime upgrade, a precision hint ignored) fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.errors import UnknownModel
from pipeline.model.embedder import backend_of
from pipeline.model.loading import load_embedder
from pipeline.model.openvino_backend import cpu_has_bf16
from pipeline.model.torch_backend import SentenceTransformerEmbedder
from pipeline.settings import Settings
from tests.support.similarity import cosines
from tests.support.sts_data import dev_texts

pytestmark = pytest.mark.slow

SENTENCES = 400


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return dev_texts()[:SENTENCES]


@pytest.fixture(scope="module")
def torch_vectors(texts: list[str]) -> Any:
    return SentenceTransformerEmbedder(Settings(backend="torch", device="cpu")).embed(texts)


def embed_with(backend: str, export_dir: Path, texts: list[str]) -> Any:
    embedder = load_embedder(Settings(backend=backend, device="cpu", export_dir=export_dir))
    return backend_of(embedder), embedder.embed(texts)


@pytest.mark.parametrize(("backend", "min_cosine"), [
    ("onnx", 0.99999), ("openvino-f32", 0.99999),
])
def test_fp32_backends_match_torch(backend: str, min_cosine: float, export_dir: Path,
                                   texts: list[str], torch_vectors: Any) -> None:
    ran, got = embed_with(backend, export_dir, texts)
    assert ran == backend
    assert cosines(got.vectors, torch_vectors.vectors).min() >= min_cosine
    assert np.array_equal(got.token_counts, torch_vectors.token_counts)


def test_openvino_bf16_stays_within_its_bound_or_is_refused(
    export_dir: Path, texts: list[str], torch_vectors: Any
) -> None:
    if not cpu_has_bf16():
        with pytest.raises(UnknownModel, match="native bf16"):
            embed_with("openvino-bf16", export_dir, texts)
        return
    ran, got = embed_with("openvino-bf16", export_dir, texts)
    assert ran == "openvino-bf16"
    assert cosines(got.vectors, torch_vectors.vectors).min() >= 0.9999


def test_plain_openvino_reports_the_precision_it_chose(export_dir: Path) -> None:
    ran, _ = embed_with("openvino", export_dir, ["one short text"])
    assert ran == ("openvino-bf16" if cpu_has_bf16() else "openvino-f32")


def test_onnx_int8_stays_within_its_bound(export_dir: Path, texts: list[str],
                                          torch_vectors: Any) -> None:
    ran, got = embed_with("onnx-int8", export_dir, texts)
    assert ran == "onnx-int8"
    assert cosines(got.vectors, torch_vectors.vectors).mean() > 0.98
