"""`EMBEDSTREAM_BACKEND=auto` (the default): the fastest backend that still gives torch's vectors.

On a CPU, a worker runs whichever of OpenVINO (bf16 where the CPU has
native bf16, else f32), ONNX Runtime fp32 and torch is fastest on this
machine among those whose vectors stay within cosine `MIN_COSINE` of
sentence-transformers' own (torch is the reference, so it always
qualifies). Which one wins depends on the CPU: OpenVINO's bf16 path is
about twice ONNX Runtime's on a CPU with AVX512_BF16 or AMX, and not
available without; so it is measured, not assumed.

The measurement runs once per machine and model: in a child process (torch
is never loaded into a worker, as for the export), on `CALIBRATION` texts
of one to four sentences. Every candidate is loaded and run in first, then
they take turns for `ROUNDS` rounds (each round in another order) and each
one's best time counts: a load that comes and goes (another process
starting beside the worker) then costs each candidate a round, not the one
measured while it lasted. One measurement runs at a time in an export dir
(one file lock for all models): the first workers of two models measured
at once would each time the other's load. The verdict is a JSON
file beside the exported graphs, named by model, revision, runtime
versions, CPU, thread count and the code of the backends and of the
measurement (`MEASURED_CODE`), so a different machine, upgrade, change to a
backend or `OMP_NUM_THREADS` measures again. The worker logs it, registers it with its
model (`/v1/models` shows `backend` and `backend_reason`), and jobs record
the backend that embedded them. STS-B dev Spearman of each backend is
checked by the test suite (tests/pipeline/test_backend_fidelity.py), not
at start. int8 is never chosen (its vectors are not torch's); a user pins
any backend, `onnx` for an exact fp32 one, with `EMBEDSTREAM_BACKEND`.

On a GPU (or with `EMBEDSTREAM_DTYPE=float16`) `auto` means `onnx`, as before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.keys import model_slug
from pipeline.model.files import atomically, file_lock, model_folder, model_revision
from pipeline.model.runtime import compute_threads

logger = logging.getLogger(__name__)

MIN_COSINE = 0.9999
# A verdict reached by other code is not this code's: a change to any of these
# modules (a backend, or how they are measured) measures again.
MEASURED_CODE = ("choice", "onnx_backend", "openvino_backend", "torch_backend")
CHOICE_TIMEOUT_S = 900.0
ROUNDS = 3
# Two sentences each of several kinds and lengths; CALIBRATION joins them into 1-4 sentence texts.
SENTENCES = (
    "A man is playing a guitar on the stage.",
    "The central bank raised interest rates by a quarter of a percentage point on Tuesday.",
    "Kids are splashing in a shallow pool behind the house.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "The committee postponed the vote until more evidence about the bridge's safety is in.",
    "Two dogs chase each other across a snowy field.",
    "Stir the sauce constantly so that it does not stick to the bottom of the pan.",
    "The patient was given antibiotics after the infection spread to the lymph nodes.",
    "Our quarterly revenue grew eleven percent, driven mostly by subscriptions in Europe.",
    "She whispered that the train would be late again.",
    "Mount the drive, then copy the backup archive to the new partition before rebooting.",
    "An old lighthouse stands on the cliff, its lamp dark for decades.",
    "The defendant's lawyer argued that the contract was void from the start.",
    "Migratory birds use the Earth's magnetic field to find their way south.",
    "Is there a vegetarian option on the lunch menu today?",
)
CALIBRATION = tuple(
    " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 4))
    for i in range(128)
)


@dataclass(frozen=True)
class Choice:
    """The backend `auto` runs, and why (as /v1/models says it)."""

    backend: str
    reason: str


@dataclass(frozen=True)
class Measured:
    backend: str
    texts_per_s: float
    min_cosine: float


def choose_backend(settings: Any) -> Choice:
    """The backend `auto` means for these settings: measured on a CPU, `onnx` elsewhere."""
    if settings.dtype != "float32" or _on_gpu(settings.device):
        return Choice("onnx", "auto: ONNX Runtime fp32 (on a GPU or with a float16 dtype "
                      "nothing is measured)")
    folder = model_folder(settings.model)
    export_dir = Path(settings.export_dir or Path(settings.data_dir) / "onnx")
    verdict = export_dir / f"{model_slug(settings.model)}-{model_revision(folder)}-backend-" \
                           f"{machine_fingerprint()}.json"
    try:
        # One lock for every model's verdict: two measurements at once time each other.
        with file_lock(export_dir / "backend-choice.lock"):
            if not verdict.exists():
                _measure_in_child(settings, verdict)
            data = json.loads(verdict.read_text())
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        logger.warning("could not measure the backends (%s); running onnx", exc)
        return Choice("onnx", f"auto: onnx, as measuring the backends failed ({exc})")
    choice = Choice(str(data["backend"]), str(data["reason"]))
    logger.info("backend %s", choice.reason)
    return choice


def decide(measured: list[Measured]) -> Choice:
    """The fastest measurement within MIN_COSINE of torch, with the figures that chose it."""
    fair = [m for m in measured if m.min_cosine >= MIN_COSINE]
    best = max(fair, key=lambda m: m.texts_per_s)
    figures = ", ".join(f"{m.backend} {m.texts_per_s:,.0f} texts/s (min cos {m.min_cosine:.6f})"
                        for m in sorted(measured, key=lambda m: -m.texts_per_s))
    return Choice(best.backend, f"auto: {best.backend}, the fastest on this machine whose "
                  f"vectors stay within cosine {MIN_COSINE} of torch; measured {figures}")


def measure(settings: Any) -> list[Measured]:
    """Time torch and each candidate on CALIBRATION, in turns, and compare their vectors."""
    from pipeline.model.torch_backend import SentenceTransformerEmbedder

    settings = settings.replace(device="cpu")
    embedders = [SentenceTransformerEmbedder(settings.replace(backend="torch"))]
    for build in _candidates():
        try:
            embedders.append(build(settings))
        except Exception as exc:  # a runtime that will not run this model is not a candidate
            logger.warning("a backend is left out of the choice: %s", exc)
    return timed_in_turns(embedders, list(CALIBRATION))


def timed_in_turns(embedders: list[Any], texts: list[str],
                   rounds: int = ROUNDS) -> list[Measured]:
    """Each embedder's best texts/s over `rounds` rounds in which they take turns, and the
    min cosine of its vectors to the first one's (the reference, torch)."""
    for embedder in embedders:
        embedder.embed(texts[:32])  # the run-in: first calls of a shape are slow
    count = len(embedders)
    best = [float("inf")] * count
    vectors: list[Any] = [None] * count
    for round_ in range(rounds):
        for i in [*range(round_ % count, count), *range(round_ % count)]:
            started = time.perf_counter()
            made = embedders[i].embed(texts).vectors
            best[i] = min(best[i], time.perf_counter() - started)
            if vectors[i] is None:
                vectors[i] = made
    return [Measured(embedder.info.backend, len(texts) / seconds,
                     1.0 if i == 0 else float(_cosines(vectors[i], vectors[0]).min()))
            for i, (embedder, seconds) in enumerate(zip(embedders, best, strict=True))]


def machine_fingerprint() -> str:
    """A short hash of what makes a measurement this machine's and this code's: CPU,
    threads, runtimes, and the source of the backends and of the measurement."""
    parts = [_cpu_model(), str(compute_threads())]
    for package in ("onnxruntime", "openvino", "torch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            parts.append(f"{package}={importlib.metadata.version(package)}")
    digest = hashlib.sha256("\n".join(parts).encode())
    for path in measured_code():
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def measured_code() -> list[Path]:
    """The modules that make the candidates and measure them (`MEASURED_CODE`)."""
    return [Path(__file__).with_name(f"{name}.py") for name in MEASURED_CODE]


def _candidates() -> list[Callable[[Any], Any]]:
    """Builders of the graph backends to measure: OpenVINO at its native precision, ONNX Runtime."""
    from pipeline.model.onnx_backend import OnnxEmbedder

    def openvino(settings: Any) -> Any:
        from pipeline.model.openvino_backend import OpenVinoEmbedder

        return OpenVinoEmbedder(settings)

    return [openvino, OnnxEmbedder]


def _cosines(a: Any, b: Any) -> Any:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _on_gpu(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    return os.uname().machine


def _measure_in_child(settings: Any, verdict: Path) -> None:
    """Measure in a child process (which loads torch) and write the verdict atomically."""
    fields = {"model": settings.model, "device": "cpu", "dtype": settings.dtype,
              "data_dir": str(settings.data_dir),
              "export_dir": str(settings.export_dir) if settings.export_dir else None}
    logger.info("measuring the backends on this machine for %s (once)", settings.model)
    subprocess.run([sys.executable, "-m", "pipeline.model.choice", json.dumps(fields),
                    str(verdict)], check=True, timeout=CHOICE_TIMEOUT_S)


def _main(fields_json: str, out: str) -> None:
    from pipeline.settings import Settings

    fields = json.loads(fields_json)
    fields["data_dir"] = Path(fields["data_dir"])
    fields["export_dir"] = Path(fields["export_dir"]) if fields["export_dir"] else None
    settings = Settings(**fields)
    choice = decide(measure(settings))
    atomically(Path(out), lambda tmp: tmp.write_text(json.dumps(dataclasses.asdict(choice))))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _main(sys.argv[1], sys.argv[2])
