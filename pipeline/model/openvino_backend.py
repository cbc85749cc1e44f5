"""The `openvino`, `openvino-bf16` and `openvino-f32` backends: our ONNX graph in OpenVINO.

Everything but the runtime is the ONNX backend's: the same export (cached
where `onnx` caches it), the same tokenization, the same length-sorted,
padded runs. OpenVINO compiles the ONNX file directly, with its dynamic
batch and token axes kept dynamic: no reshape per batch, no optimum.

Precision is part of the backend's name, and a job records the one that
ran. `openvino-bf16` runs the matmuls in bfloat16, which only pays on a CPU
with native bf16 (AVX512_BF16 or AMX; OpenVINO lists it as "BF16" among the
CPU's optimization capabilities); elsewhere it would be emulated, slower
than f32, so it is refused rather than silently degraded. `openvino` takes
bf16 where the CPU has it and f32 otherwise, and reports which.

Its cache of compiled shapes is bounded (`RUNTIME_CACHE_SHAPES`): a
worker sees every batch size and token width, and the default let memory
grow past a gigabyte.

One infer request per thread: a compiled model's own `__call__` shares a
single request, which two threads calling `embed` at once would trample.

It runs every call whole, on every thread (one lane; see the ONNX backend):
split calls need a second model compiled with a stream per lane, which took
a worker from 640 to 830 MB and was 0-18% faster alone and 6-15% beside a
busy process, against ONNX Runtime's 11-22% at no memory cost.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UnknownModel
from pipeline.model.onnx_backend import OnnxEmbedder

PRECISIONS = ("bf16", "f32")
# The CPU plugin keeps compiled primitives per input shape (batch x tokens), up to
# 5,000 shapes by default: 600 calls of random shapes (up to 32 texts) took a worker
# to 1.2 GB and still growing. Bounded at 200 shapes it stayed at 660 MB, and
# length-sorted batches of 32 ran as fast (1,100 against 1,081 texts/s).
RUNTIME_CACHE_SHAPES = 200


def cpu_has_bf16() -> bool:
    """Whether OpenVINO sees native bf16 on this CPU (AVX512_BF16 or AMX)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def choose_precision(asked: str | None) -> str:
    """The precision to compile with: `asked`, or bf16 where native; bf16 refused elsewhere."""
    if asked is None:
        return "bf16" if cpu_has_bf16() else "f32"
    if asked not in PRECISIONS:
        raise UnknownModel(f"unknown OpenVINO precision {asked!r}; use one of "
                           f"{', '.join(PRECISIONS)}")
    if asked == "bf16" and not cpu_has_bf16():
        raise UnknownModel("EMBEDSTREAM_BACKEND=openvino-bf16 needs a CPU with native bf16 "
                           "(AVX512_BF16 or AMX), and this one has neither; use openvino-f32 "
                           "or openvino (which picks f32 here)")
    return asked


class OpenVinoEmbedder(OnnxEmbedder):
    """The ONNX backend with OpenVINO's CPU runtime in place of ONNX Runtime."""

    def __init__(self, settings: Any, precision: str | None = None) -> None:
        self.precision = choose_precision(precision)
        self._requests = threading.local()
        super().__init__(settings, quantized=False)

    def _backend_name(self, quantized: bool) -> str:
        return f"openvino-{self.precision}"

    def _open(self, graph: Path, settings: Any, threads: int) -> str:
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": threads,
                  "CPU_RUNTIME_CACHE_CAPACITY": RUNTIME_CACHE_SHAPES}
        self.lanes = 1
        self.compiled = ov.Core().compile_model(str(graph), "CPU", config)
        self.inputs = [port.get_any_name() for port in self.compiled.inputs]
        return f"OpenVINO CPU {self.precision}"

    def _infer(self, feed: dict[str, np.ndarray[Any, Any]], output: str) -> Any:
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self.compiled.create_infer_request()
        request.infer(feed)
        return request.get_tensor(output).data.copy()
