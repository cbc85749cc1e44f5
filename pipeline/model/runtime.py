"""Where and how a backend runs: compute threads, device, precision.

Workers on one machine share its cores: `up --workers N` gives each worker
`OMP_NUM_THREADS` = cores / N, and every backend takes its intra-op thread
count from there (else from the cores this process may run on), so N workers
never start N x cores compute threads between them.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16")


def compute_threads() -> int:
    """Intra-op threads for this process: OMP_NUM_THREADS, else its usable cores."""
    raw = os.environ.get("OMP_NUM_THREADS", "")
    if raw.strip().isdigit() and int(raw) > 0:
        return int(raw)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def torch_device(device: str) -> str:
    """The torch device for a `device` setting (`auto`: CUDA when torch sees one)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def ort_providers(device: str) -> list[str]:
    """ONNX Runtime execution providers for a `device` setting, best first."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wants_cuda = device.startswith("cuda") or device == "auto"
    if wants_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device.startswith("cuda"):
        logger.warning("EMBEDSTREAM_DEVICE=%s, but this onnxruntime has no CUDA provider "
                       "(install onnxruntime-gpu); running on the CPU", device)
    return ["CPUExecutionProvider"]


def check_dtype(dtype: str) -> str:
    """Validate an `EMBEDSTREAM_DTYPE` value."""
    if dtype not in DTYPES:
        raise ValueError(f"EMBEDSTREAM_DTYPE must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return dtype
