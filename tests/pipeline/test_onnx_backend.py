"""The ONNX backends against sentence-transformers itself, on the STS-B dev split."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.model.embedder import backend_of
from pipeline.model.files import model_folder
from pipeline.model.loading import load_embedder
from pipeline.model.onnx_backend import (
    SPLIT_MIN_TEXTS,
    ensure_exported,
    export_path,
    halves,
    token_runs,
)
from pipeline.model.torch_backend import SentenceTransformerEmbedder
from pipeline.settings import Settings
from tests.support.similarity import cosines
from tests.support.sts_data import dev_texts

pytestmark = pytest.mark.slow
# Whichever test first asks for `torch_vectors` pays for torch encoding the ~3,000 dev
# texts (~40 s on 2 cores), and on a fresh machine for the ONNX export (~10 s) too.
TORCH_ENCODE_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def torch_vectors() -> Any:
    embedder = SentenceTransformerEmbedder(Settings(backend="torch", device="cpu"))
    return embedder.embed(dev_texts())


@pytest.mark.timeout(TORCH_ENCODE_TIMEOUT_S)
def test_onnx_matches_torch_on_every_dev_text(export_dir: Path, torch_vectors: Any) -> None:
    embedder = load_embedder(Settings(backend="onnx", device="cpu", export_dir=export_dir))
    assert backend_of(embedder) == "onnx"
    got = embedder.embed(dev_texts())
    assert cosines(got.vectors, torch_vectors.vectors).min() >= 0.99999
    assert np.array_equal(got.token_counts, torch_vectors.token_counts)


@pytest.mark.timeout(TORCH_ENCODE_TIMEOUT_S)
def test_int8_stays_close_to_fp32(export_dir: Path, torch_vectors: Any) -> None:
    embedder = load_embedder(Settings(backend="onnx-int8", device="cpu", export_dir=export_dir))
    assert backend_of(embedder) == "onnx-int8"
    texts = dev_texts()[:400]
    got = embedder.embed(texts)
    assert cosines(got.vectors, torch_vectors.vectors[:400]).mean() > 0.98


def test_export_is_reused_from_the_cache(export_dir: Path) -> None:
    folder = model_folder("all-MiniLM-L6-v2")
    from pipeline.model.files import model_revision

    target = export_path(export_dir, "all-MiniLM-L6-v2", model_revision(folder), False)
    ensure_exported(folder, target, quantized=False)
    stamp = target.stat().st_mtime_ns
    assert ensure_exported(folder, target, quantized=False) == target
    assert target.stat().st_mtime_ns == stamp
    assert not [p for p in export_dir.iterdir() if p.suffix == ".tmp"]


def test_a_model_that_will_not_export_falls_back_to_torch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = model_folder("all-MiniLM-L6-v2")
    broken = tmp_path / "model"
    broken.mkdir()
    for path in folder.iterdir():
        if path.name != "tokenizer.json":
            (broken / path.name).symlink_to(path)
    embedder = load_embedder(Settings(backend="onnx", device="cpu", model=str(broken),
                                      export_dir=tmp_path / "exports"))
    assert backend_of(embedder) == "torch"
    assert "falling back to torch" in caplog.text


def test_token_runs_cut_by_padded_tokens_not_count() -> None:
    lengths = np.array([5] * 10 + [100] * 3)
    runs = token_runs(lengths, max_texts=64, max_tokens=200)
    assert [(r.start, r.stop) for r in runs] == [(0, 10), (10, 12), (12, 13)]


def test_halves_pad_to_about_the_same_tokens() -> None:
    # 40 texts of 10 tokens and 2 of 100: 39 short ones against the two long ones and a
    # short one padded to 100 (390 against 300 padded tokens), not 21 and 21 (210 and 2,100).
    assert halves(np.array([10] * 40 + [100] * 2)) == 39
    assert halves(np.array([10] * 8)) == 4
    lengths = np.sort(np.random.default_rng(0).integers(5, 120, 64))
    cut = halves(lengths)
    first, second = cut * lengths[cut - 1], (64 - cut) * lengths[-1]
    assert max(first, second) <= 1.25 * min(first, second) + lengths[-1]


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_a_split_call_runs_on_two_threads_and_matches_whole_runs(
    backend: str, export_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    embedder: Any = load_embedder(Settings(backend=backend, device="cpu", export_dir=export_dir))
    assert embedder.lanes == 2
    threads: set[str] = set()
    run = embedder._run

    def spy(encodings: list[Any], output: str = "sentence_embedding") -> Any:
        threads.add(threading.current_thread().name)
        return run(encodings, output)

    monkeypatch.setattr(embedder, "_run", spy)
    texts = [*dev_texts()[:40], "a much longer text than the others, " * 12]
    split = embedder.embed(texts)
    assert len(threads) == 2  # the caller and the lane
    one_by_one = np.concatenate([embedder.embed([t]).vectors for t in texts])
    # int8 quantizes each run's activations with one scale: its rows move with their batch.
    assert cosines(split.vectors, one_by_one).min() >= (0.98 if backend == "onnx-int8" else 0.99999)
    threads.clear()
    embedder.embed(texts[:SPLIT_MIN_TEXTS - 1])
    assert threads == {threading.current_thread().name}  # a small call runs whole, here


def test_one_thread_runs_one_lane(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    embedder: Any = load_embedder(Settings(backend="onnx", device="cpu", export_dir=export_dir))
    assert embedder.lanes == 1 and embedder._lane is None
    assert embedder.embed(dev_texts()[:20]).vectors.shape == (20, 384)


def test_openvino_runs_calls_whole(export_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    embedder: Any = load_embedder(Settings(backend="openvino-f32", device="cpu",
                                           export_dir=export_dir))
    assert embedder.lanes == 1 and embedder._lane is None
