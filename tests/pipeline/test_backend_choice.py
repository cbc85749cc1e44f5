"""`EMBEDSTREAM_BACKEND=auto`: the fastest backend whose vectors are torch's, measured once."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from pipeline.model import choice as choice_module
from pipeline.model.choice import MIN_COSINE, Measured, choose_backend, decide
from pipeline.model.embedder import Embedded
from pipeline.model.info import ModelInfo
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


class Paced:
    """An embedder that takes `seconds_per_text`, and ten times that while the machine is busy."""

    def __init__(self, name: str, seconds_per_text: float, busy: list[int]) -> None:
        self.info = ModelInfo(name, 4, 128, {}, None, name)
        self.seconds_per_text = seconds_per_text
        self.busy = busy  # timed calls still to run on a busy machine

    def embed(self, texts: Sequence[str]) -> Embedded:
        slow = 1
        if len(texts) > 32 and self.busy[0] > 0:
            self.busy[0] -= 1
            slow = 10
        time.sleep(self.seconds_per_text * len(texts) * slow)
        return Embedded(np.ones((len(texts), 4), np.float32), np.ones(len(texts), np.int64))


def test_a_load_that_passes_costs_each_candidate_a_round_not_the_first_its_verdict() -> None:
    busy = [2]  # the first two timed calls run beside a busy process
    texts = [f"text {i}" for i in range(64)]
    embedders = [Paced("torch", 0.0004, busy), Paced("onnx", 0.0002, busy),
                 Paced("openvino-bf16", 0.0001, busy)]
    measured = choice_module.timed_in_turns(embedders, texts)
    assert [m.backend for m in measured] == ["torch", "onnx", "openvino-bf16"]
    speeds = {m.backend: m.texts_per_s for m in measured}
    # Each one's best round was a quiet one: the true order, at about the true speeds.
    assert speeds["openvino-bf16"] > speeds["onnx"] > speeds["torch"]
    assert speeds["torch"] > 0.7 / 0.0004 and speeds["onnx"] > 0.7 / 0.0002
    assert decide(measured).backend == "openvino-bf16"


def test_one_measurement_at_a_time_in_an_export_dir_whatever_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    running, most = [0], [0]

    def measuring(settings: Settings, verdict: Path) -> None:
        running[0] += 1
        most[0] = max(most[0], running[0])
        time.sleep(0.3)
        running[0] -= 1
        verdict.write_text(json.dumps({"backend": "onnx", "reason": settings.model}))

    monkeypatch.setattr(choice_module, "_measure_in_child", measuring)
    monkeypatch.setattr(choice_module, "model_folder", lambda name: tmp_path)
    monkeypatch.setattr(choice_module, "model_revision", lambda folder: "r")
    threads = [threading.Thread(target=choose_backend, args=(
        Settings(device="cpu", export_dir=tmp_path, model=f"org/model-{i}"),)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert most[0] == 1
    assert len(list(tmp_path.glob("*-backend-*.json"))) == 3  # each model has its verdict
