"""GPU backends: torch in fp16 and ONNX Runtime's CUDA provider, where a GPU is present."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.model.loading import load_embedder
from pipeline.model.torch_backend import SentenceTransformerEmbedder
from pipeline.settings import Settings

pytestmark = pytest.mark.slow

TEXTS = ["a man is playing a guitar .", "a woman is slicing an onion .", "", "x " * 400]


def cuda_or_skip() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine (torch.cuda.is_available() is False): "
                    "the GPU backends are not tested here")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_torch_fp16_on_cuda_matches_fp32_on_the_cpu() -> None:
    cuda_or_skip()
    cpu = SentenceTransformerEmbedder(Settings(backend="torch", device="cpu")).embed(TEXTS)
    gpu = SentenceTransformerEmbedder(Settings(backend="torch", device="cuda",
                                               dtype="float16")).embed(TEXTS)
    assert cosines(cpu.vectors, gpu.vectors).min() > 0.999
    assert np.array_equal(cpu.token_counts, gpu.token_counts)


def test_onnx_on_cuda_uses_the_cuda_provider_and_matches_the_cpu() -> None:
    cuda_or_skip()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    gpu = load_embedder(Settings(backend="onnx", device="cuda"))
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"  # type: ignore[attr-defined]
    cpu = load_embedder(Settings(backend="onnx", device="cpu"))
    assert cosines(cpu.embed(TEXTS).vectors, gpu.embed(TEXTS).vectors).min() > 0.9999
