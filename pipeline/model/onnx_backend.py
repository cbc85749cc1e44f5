"""The `onnx` and `onnx-int8` backends: the model exported once, run by ONNX Runtime.

The export is ours (sentence-transformers' own `backend="onnx"` needs
`optimum-onnx`, which cannot be installed next to current transformers):
the whole sentence-transformers module sequence (Transformer, Pooling,
Normalize, Dense, ... as modules.json lists them) is traced by
`torch.onnx.export`, so pooling and normalization are exactly
sentence-transformers' own and run inside the graph. Tokenization uses the
model's own fast tokenizer (`tokenizer.json`) with the model's length limit.

The graph has two outputs: `sentence_embedding`, and `token_embeddings`
(the Transformer module's output, before pooling), which late chunking
pools over each chunk's span (`embed_tokens`); `embed` asks for the first
only.

Exports are cached under `<export_dir>/` (default `<data_dir>/onnx/`), named
by model, revision (a hash of the model's files), onnxruntime version and
the graph's outputs (`-tokens`), so a changed model, runtime or export never
reuses a stale graph. The export runs in a
child process (torch is never loaded into a worker that finds its graph
cached), under a file lock, into a temporary file that `os.replace` moves
into place: two workers starting together never see a half-written file.

`onnx-int8` quantizes the MatMul weights only, per output channel
(`quantize_dynamic(op_types_to_quantize=["MatMul"], per_channel=True)`).
Quantizing every op per tensor, the naive way, loses too much (min cosine
to fp32 about 0.89); this way keeps STS-B Spearman within 0.005 of fp32.

On a CPU with two or more compute threads, a call of `SPLIT_MIN_TEXTS` or
more is cut in two halves by length, with about the same padded tokens
each, run at once on two lanes of half the threads each (the calling thread
and one more). One run across every thread waits at each layer for its
slowest thread, and on a few cores shared with the server and Redis that
thread is often the one that lost its core: two lanes that share nothing
lose only the time actually taken from them. Measured on 2 cores, lanes
against one 2-thread run: onnx-int8 1,368 against 1,117 texts/s alone and
1,116 against 1,006 beside a process taking 20% of a core. Smaller calls
(one query) run whole.

A model that will not export (or has no fast tokenizer) is logged and served
by the torch backend instead; its `ModelInfo.backend` then says `torch`.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.keys import model_slug
from pipeline.model.embedder import Embedded
from pipeline.model.files import (
    ExportFailed,
    atomically,
    file_lock,
    model_folder,
    model_revision,
)
from pipeline.model.info import canonical_model_name, describe_local_model, read_json
from pipeline.model.runtime import compute_threads, ort_providers
from pipeline.model.spans import TokenEmbeddings

logger = logging.getLogger(__name__)

OPSET = 17
# A model call is cut into session runs of at most this many texts and padded
# tokens: sorted by length, so short texts are never padded to a long one.
RUN_MAX_TEXTS = 64
RUN_MAX_TOKENS = 8192
# Calls of at least this many texts run as two halves at once (see above).
SPLIT_MIN_TEXTS = 8
EXPORT_TIMEOUT_S = 900.0
OUTPUTS = ["sentence_embedding", "token_embeddings"]


def export_path(export_dir: Path, name: str, revision: str, quantized: bool) -> Path:
    """Where the graph of (model, revision, onnxruntime version, outputs, precision) is cached."""
    import onnxruntime as ort

    kind = "int8" if quantized else "fp32"
    return export_dir / f"{model_slug(name)}-{revision}-ort{ort.__version__}-tokens-{kind}.onnx"


def ensure_exported(folder: Path, target: Path, quantized: bool) -> Path:
    """The cached graph at `target`, exported (and quantized) first if missing."""
    if target.is_file():
        return target
    with file_lock(target.with_suffix(".lock")):
        if target.is_file():  # a peer exported it while we waited for the lock
            return target
        if quantized:
            fp32 = target.with_name(target.name.replace("-int8.onnx", "-fp32.onnx"))
            ensure_exported(folder, fp32, quantized=False)
            atomically(target, lambda tmp: quantize(fp32, tmp))
        else:
            atomically(target, lambda tmp: _export_in_child(folder, tmp))
    return target


def _export_in_child(folder: Path, out: Path) -> None:
    started = time.perf_counter()
    command = [sys.executable, "-m", "pipeline.model.onnx_backend", str(folder), str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S,
                          check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportFailed(f"torch.onnx.export failed: {tail[0][:300]}")
    logger.info("exported %s to ONNX in %.1fs", folder, time.perf_counter() - started)


def export_model(folder: Path, out: Path) -> None:
    """Trace the sentence-transformers model in `folder` into an ONNX graph at `out`."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu").eval()
    sample = _export_sample(model)
    names = list(sample)

    class Traced(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.model(dict(zip(names, tensors, strict=True)))
            return features["sentence_embedding"], features["token_embeddings"]

    axes = {name: {0: "batch", 1: "tokens"} for name in (*names, "token_embeddings")}
    with torch.no_grad():
        torch.onnx.export(Traced().eval(), tuple(sample[n] for n in names), str(out),
                          input_names=names, output_names=OUTPUTS,
                          dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)


def _export_sample(model: Any) -> dict[str, Any]:
    # Two texts of different lengths, so the traced graph has real padding.
    texts = ["a short one", "a somewhat longer sentence to trace the padded attention with"]
    features = model.preprocess(texts) if hasattr(model, "preprocess") else model.tokenize(texts)
    return {k: v for k, v in features.items() if hasattr(v, "shape")}


def quantize(fp32: Path, out: Path) -> None:
    """Dynamic int8 quantization of the MatMul weights, per channel."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(fp32), str(out), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8)


class OnnxEmbedder:
    """Embeds with an exported graph in ONNX Runtime, full graph optimization."""

    def __init__(self, settings: Any, quantized: bool = False) -> None:
        name = canonical_model_name(settings.model)
        folder = model_folder(name)
        info = describe_local_model(str(folder))
        if info is None or not (folder / "tokenizer.json").is_file():
            raise ExportFailed(f"model {name!r} has no fast tokenizer (tokenizer.json)")
        self.info = dataclasses.replace(info, name=name, backend=self._backend_name(quantized))
        started = time.perf_counter()
        export_dir = settings.export_dir or Path(settings.data_dir) / "onnx"
        self.revision = model_revision(folder)
        graph = ensure_exported(folder, export_path(Path(export_dir), name, self.revision,
                                                    quantized), quantized)
        threads = compute_threads()
        where = self._open(graph, settings, threads)
        self._lane = ThreadPoolExecutor(1, "embed-lane") if self.lanes == 2 else None
        self._tokenizers(folder)
        logger.info("loaded %s (%s, %d dims, %d tokens max, %d threads in %d lanes, %s) in "
                    "%.1fs", name, self.info.backend, self.info.dimensions,
                    self.info.max_seq_length, threads, self.lanes, where,
                    time.perf_counter() - started)

    def _backend_name(self, quantized: bool) -> str:
        return "onnx-int8" if quantized else "onnx"

    def _open(self, graph: Path, settings: Any, threads: int) -> str:
        """Start the runtime on `graph`; sets `self.inputs` and `self.lanes`, says where it runs."""
        import onnxruntime as ort

        providers = ort_providers(settings.device)
        self.lanes = 2 if threads >= 2 and providers[0] == "CPUExecutionProvider" else 1
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One session serves both lanes: a run uses its caller's thread and these.
        options.intra_op_num_threads = threads // self.lanes
        options.inter_op_num_threads = 1
        # Idle intra-op threads sleep instead of spinning: on a few shared cores a
        # spinning pool starves the worker's own event loop and the server beside it.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(graph), options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        return str(self.session.get_providers()[0])

    def _infer(self, feed: dict[str, np.ndarray[Any, Any]], output: str) -> Any:
        """One run of the graph on a padded batch: the named output."""
        return self.session.run([output], feed)[0]

    def _tokenizers(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        self.counter = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.counter.no_truncation()
        self.counter.no_padding()
        self.truncator = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.truncator.no_padding()
        self.truncator.enable_truncation(self.info.max_seq_length)
        padding = self.counter.padding or {}
        self.pad_id = int(padding.get("pad_id", 0))
        config = read_json(folder / "sentence_bert_config.json")
        self.lower = bool(config.get("do_lower_case", False))

    def embed(self, texts: Sequence[str]) -> Embedded:
        """Embed texts; rows keep the order of `texts`."""
        encodings, counts = self._encode(texts)
        lengths = np.minimum(counts, self.info.max_seq_length)
        out = np.empty((len(texts), self.info.dimensions), dtype=np.float32)
        order = np.argsort(lengths, kind="stable")
        if self._lane is None or len(texts) < SPLIT_MIN_TEXTS:
            self._embed_sorted(encodings, order, lengths, out)
            return Embedded(out, counts)
        cut = halves(lengths[order])
        other = self._lane.submit(self._embed_sorted, encodings, order[cut:], lengths, out)
        self._embed_sorted(encodings, order[:cut], lengths, out)
        other.result()
        return Embedded(out, counts)

    def _embed_sorted(self, encodings: list[Any], order: np.ndarray[Any, Any],
                      lengths: np.ndarray[Any, Any], out: np.ndarray[Any, Any]) -> None:
        """Embed the texts at `order` (sorted by length) into their rows of `out`."""
        for rows in token_runs(lengths[order], RUN_MAX_TEXTS, RUN_MAX_TOKENS):
            index = order[rows]
            out[index] = self._run([encodings[i] for i in index])

    def embed_tokens(self, texts: Sequence[str]) -> list[TokenEmbeddings]:
        """Each text's token embeddings (the graph's second output) and their characters.

        Special and padding tokens (no characters) are left out. Texts go one
        run each: late chunking hands over a few window-long texts at a time.
        """
        encodings, _ = self._encode(texts)
        found: list[TokenEmbeddings] = []
        for encoding in encodings:
            tokens = self._run([encoding], "token_embeddings")[0]
            offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
            real = offsets[:, 1] > offsets[:, 0]
            found.append(TokenEmbeddings(tokens[real], offsets[real]))
        return found

    def _encode(self, texts: Sequence[str]) -> tuple[list[Any], np.ndarray[Any, Any]]:
        """Each text's encoding (cut at the model's limit) and its token count before that."""
        prepared = [t.lower() for t in texts] if self.lower else list(texts)
        encodings = self.counter.encode_batch(prepared)
        counts = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
        # Truncating only the texts over the limit: one tokenizer pass for the rest.
        long = [int(i) for i in np.flatnonzero(counts > self.info.max_seq_length)]
        for i, encoding in zip(long, self.truncator.encode_batch([prepared[i] for i in long]),
                               strict=True):
            encodings[i] = encoding
        return encodings, counts

    def _run(self, encodings: list[Any],
             output: str = "sentence_embedding") -> np.ndarray[Any, np.dtype[np.float32]]:
        width = max(len(e.ids) for e in encodings)
        feed = {name: np.zeros((len(encodings), width), dtype=np.int64) for name in self.inputs}
        ids = feed["input_ids"]
        ids.fill(self.pad_id)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            ids[row, :n] = encoding.ids
            if "attention_mask" in feed:
                feed["attention_mask"][row, :n] = 1
            if "token_type_ids" in feed:
                feed["token_type_ids"][row, :n] = encoding.type_ids
        return np.asarray(self._infer(feed, output), dtype=np.float32)


def halves(sorted_lengths: np.ndarray[Any, Any]) -> int:
    """Where to cut length-sorted texts so both halves pad to about the same tokens.

    Each half pads to its longest text: the first `k` to `lengths[k - 1]`, the
    rest to the last. The cut that makes the larger of the two smallest.
    """
    n = len(sorted_lengths)
    k = np.arange(1, n)
    first = k * sorted_lengths[:-1]
    second = (n - k) * sorted_lengths[-1]
    return int(k[np.argmin(np.maximum(first, second))])


def token_runs(sorted_lengths: np.ndarray[Any, Any], max_texts: int,
               max_tokens: int) -> list[slice]:
    """Cut length-sorted texts into runs of at most `max_texts` and `max_tokens` padded."""
    runs: list[slice] = []
    start = 0
    for end in range(1, len(sorted_lengths) + 1):
        width = int(sorted_lengths[end - 1])
        if end - start > max_texts or (end - start) * width > max_tokens:
            runs.append(slice(start, end - 1))
            start = end - 1
    if start < len(sorted_lengths):
        runs.append(slice(start, len(sorted_lengths)))
    return runs


if __name__ == "__main__":  # the export child: python -m pipeline.model.onnx_backend FOLDER OUT
    export_model(Path(sys.argv[1]), Path(sys.argv[2]))
