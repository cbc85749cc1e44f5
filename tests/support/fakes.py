"""Small embedders that tests control, usable in-process and from worker processes.

A worker process picks one with `EMBEDSTREAM_BACKEND=tests.support.fakes:<Factory>`
(with the repository root on PYTHONPATH); in-process tests build them directly. Each factory
takes a Settings, like every backend.

The fakes report the settings' model under its canonical name, so a fake
worker reads the same queue as a real one. For the default model they also
report its real shape (384 dims, 256 tokens, read from the bundled files),
so the server's validation matches the real model's even before a fake
worker registered; any other model name gets 8 dims and 16 tokens.

Vectors are deterministic: a text's vector is drawn from a generator seeded
with a hash of the text, so equal texts get equal vectors in any batch, and
`expected_vector` recomputes one for assertions. A text counts one token per
word plus two (the [CLS] and [SEP] of a BERT tokenizer).
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.model.embedder import Embedded, shape_vectors
from pipeline.model.info import ModelInfo, canonical_model_name, describe_local_model
from pipeline.settings import Settings

FAKE_DIMENSIONS = 8
FAKE_MAX_SEQ_LENGTH = 16
DELAY_ENV = "EMBEDSTREAM_FAKE_DELAY_S"
POISON = "POISON"
NAN = "NAN"
CRASH = "CRASH"


def fake_model_info(model: str) -> ModelInfo:
    """What a fake reports for `model`: the real shape when local, else a tiny one."""
    local = describe_local_model(model)
    if local is not None:
        return local
    return ModelInfo(canonical_model_name(model), FAKE_DIMENSIONS, FAKE_MAX_SEQ_LENGTH)


def raw_vector(text: str, dimensions: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The unnormalized vector a fake gives `text`."""
    seed = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(dimensions).astype(np.float32)


def expected_vector(
    text: str, dimensions: int, *, output_dimensions: int | None = None, normalize: bool = True
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The vector a worker stores for `text` embedded by a fake, shaped as the job asked."""
    shaped = shape_vectors(raw_vector(text, dimensions)[None, :], output_dimensions, normalize)
    return shaped[0]


def token_count(text: str) -> int:
    """Tokens a fake counts for `text`: words plus two."""
    return len(text.split()) + 2


class HashEmbedder:
    """Deterministic vectors from a hash of each text; records every call."""

    def __init__(self, settings: Settings, *, info: ModelInfo | None = None) -> None:
        self.info = info or fake_model_info(settings.model)
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> Embedded:
        """Embed texts; rows keep their order."""
        with self._lock:
            self.calls.append(list(texts))
        self.before_embed(texts)
        vectors = np.vstack([self.vector(text) for text in texts]) if texts else np.zeros(
            (0, self.info.dimensions), np.float32)
        counts = np.array([token_count(text) for text in texts], dtype=np.int64)
        return Embedded(vectors.astype(np.float32), counts)

    def vector(self, text: str) -> np.ndarray[Any, np.dtype[np.float32]]:
        """One text's raw vector."""
        return raw_vector(text, self.info.dimensions)

    def before_embed(self, texts: Sequence[str]) -> None:
        """A hook for subclasses: delay, block or fail a call."""

    @property
    def embedded_texts(self) -> list[str]:
        """Every text passed to a successful or failed call, in call order."""
        with self._lock:
            return [text for call in self.calls for text in call]


class PoisonEmbedder(HashEmbedder):
    """Fails the whole call when any text contains "POISON", like a model that chokes."""

    def before_embed(self, texts: Sequence[str]) -> None:
        for text in texts:
            if POISON in text:
                raise ValueError("this text poisons the model")


class CrashEmbedder(HashEmbedder):
    """Kills its process with SIGSEGV when any text contains "CRASH", as native code may."""

    def before_embed(self, texts: Sequence[str]) -> None:
        if any(CRASH in text for text in texts):
            os.kill(os.getpid(), signal.SIGSEGV)


class NanEmbedder(HashEmbedder):
    """Returns a NaN vector for any text containing "NAN", without raising."""

    def vector(self, text: str) -> np.ndarray[Any, np.dtype[np.float32]]:
        if NAN in text:
            return np.full(self.info.dimensions, np.nan, dtype=np.float32)
        return super().vector(text)


class SlowEmbedder(HashEmbedder):
    """Sleeps before each call: `delay_s`, else $EMBEDSTREAM_FAKE_DELAY_S, else 0.5 s."""

    def __init__(self, settings: Settings, *, delay_s: float | None = None,
                 info: ModelInfo | None = None) -> None:
        super().__init__(settings, info=info)
        self.delay_s = delay_s if delay_s is not None else float(
            os.environ.get(DELAY_ENV, "0.5"))

    def before_embed(self, texts: Sequence[str]) -> None:
        time.sleep(self.delay_s)


class GateEmbedder(HashEmbedder):
    """Blocks each call until the test opens the gate; `entered` is set when one waits.

    The gate also opens by itself after `max_wait_s`, so a test that fails
    before opening it cannot leave a thread hanging.
    """

    def __init__(self, settings: Settings, *, max_wait_s: float = 30.0,
                 info: ModelInfo | None = None) -> None:
        super().__init__(settings, info=info)
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.max_wait_s = max_wait_s

    def before_embed(self, texts: Sequence[str]) -> None:
        self.entered.set()
        self.gate.wait(self.max_wait_s)

    def open(self) -> None:
        """Let every waiting and future call through."""
        self.gate.set()
