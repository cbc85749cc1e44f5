"""`EMBEDSTREAM_BACKEND=auto`: the fastest backend whose vectors are torch's, measured once."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.model import choice as choice_module
from pipeline.model.choice import MIN_COSINE, Measured, choose_backend, decide
from pipeline.model.loading import load_embedder
from pipeline.model.openvino_backend import cpu_has_bf16
from pipeline.settings import Settings


def test_the_fastest_backend_within_the_bound_wins_and_the_reason_gives_the_figures() -> None:
    chosen = decide([Measured("torch", 400.0, 1.0), Measured("onnx", 600.0, 1.0),
                     Measured("openvino-bf16", 1100.0, 0.99997)])
    assert chosen.backend == "openvino-bf16"
    assert chosen.reason.startswith("auto: openvino-bf16, the fastest")
    assert "onnx 600 texts/s (min cos 1.000000)" in chosen.reason


def test_a_faster_backend_whose_vectors_drift_is_never_chosen() -> None:
    drifting = Measured("openvino-bf16", 2000.0, MIN_COSINE - 1e-6)
    assert decide([Measured("torch", 400.0, 1.0), drifting]).backend == "torch"


def test_a_gpu_or_half_precision_means_onnx_without_measuring(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setattr(choice_module, "_measure_in_child", lambda *a: pytest.fail("measured"))
    assert choose_backend(Settings(dtype="float16")).backend == "onnx"
    assert choose_backend(Settings(device="cuda")).backend == "onnx"


def test_a_failed_measurement_runs_onnx_and_says_why(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: object) -> None:
        raise subprocess.CalledProcessError(1, ["python"])

    monkeypatch.setattr(choice_module, "_measure_in_child", broken)
    got = choose_backend(Settings(device="cpu", export_dir=tmp_path))
    assert got.backend == "onnx" and "measuring the backends failed" in got.reason
    assert not list(tmp_path.glob("*-backend-*.json"))  # nothing cached: the next start measures


@pytest.mark.slow
@pytest.mark.timeout(240)  # the first run on a machine exports the model and measures
def test_auto_measures_once_per_machine_and_the_worker_says_what_and_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings.from_env().replace(device="cpu")
    chosen = choose_backend(settings)
    verdicts = Path(settings.export_dir or "").glob("*-backend-*.json")
    assert chosen.reason in [json.loads(v.read_text())["reason"] for v in verdicts]
    assert chosen.backend in ("openvino-bf16", "openvino-f32", "onnx", "torch")
    for name in ("torch", "onnx"):
        assert f"{name} " in chosen.reason  # every candidate's figures
    if cpu_has_bf16():  # about twice onnx's speed here, at min cosine 0.99997
        assert chosen.backend == "openvino-bf16"

    monkeypatch.setattr(choice_module, "_measure_in_child", lambda *a: pytest.fail("measured"))
    started = time.monotonic()
    assert choose_backend(settings) == chosen  # cached: no second measurement
    assert time.monotonic() - started < 2

    embedder = load_embedder(settings.replace(backend="auto"))
    assert embedder.info.backend == chosen.backend
    assert embedder.info.backend_reason == chosen.reason


def test_a_change_to_a_backend_or_the_measurement_measures_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert {p.name for p in choice_module.measured_code()} == {
        "choice.py", "onnx_backend.py", "openvino_backend.py", "torch_backend.py"}
    assert all(p.is_file() for p in choice_module.measured_code())
    backend = tmp_path / "onnx_backend.py"
    backend.write_text("RUN_MAX_TEXTS = 32\n")
    monkeypatch.setattr(choice_module, "measured_code", lambda: [backend])
    before = choice_module.machine_fingerprint()
    assert choice_module.machine_fingerprint() == before  # the same code: the same verdict
    backend.write_text("RUN_MAX_TEXTS = 64\n")
    assert choice_module.machine_fingerprint() != before  # another backend: a new verdict
