"""The `torch` backend: sentence-transformers as it is, one thread of calls.

Features come from the model's own `preprocess` and go through its modules
(pooling and normalization included), so the vectors are `encode()`'s.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import UnknownModel
from pipeline.model.embedder import Embedded
from pipeline.model.files import ExportFailed, model_folder, model_revision
from pipeline.model.info import ModelInfo, canonical_model_name, model_source
from pipeline.model.runtime import check_dtype, compute_threads, torch_device
from pipeline.model.spans import TokenEmbeddings

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pipeline.settings import Settings

logger = logging.getLogger(__name__)


class SentenceTransformerEmbedder:
    """The `torch` backend: sentence-transformers' own encode()."""

    def __init__(self, settings: Settings, batch_size: int = 32) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        name = canonical_model_name(settings.model)
        device = torch_device(settings.device)
        torch.set_num_threads(compute_threads())
        started = time.perf_counter()
        try:
            self.model = SentenceTransformer(model_source(name), device=device)
        except OSError as exc:
            raise UnknownModel(f"cannot load model {name!r}: {exc}") from exc
        if check_dtype(settings.dtype) == "float16" and device.startswith("cuda"):
            self.model.half()  # opt-in: fp16 on a GPU; on a CPU it is slower, so not there
        self.revision = _revision(name)
        get_dimension = (getattr(self.model, "get_embedding_dimension", None)
                         or self.model.get_sentence_embedding_dimension)
        dimensions = get_dimension() or 0
        max_seq = int(self.model.max_seq_length or 512)
        prompts = {str(k): str(v) for k, v in (self.model.prompts or {}).items()}
        self.info = ModelInfo(name, int(dimensions), max_seq, prompts,
                              self.model.default_prompt_name or None, "torch")
        self.batch_size = batch_size
        self._tokenizer = _counting_tokenizer(self.model.tokenizer)
        logger.info(
            "loaded model %s (%d dims, %d tokens max) on %s in %.1fs",
            name, dimensions, max_seq, self.model.device, time.perf_counter() - started,
        )

    def embed(self, texts: Sequence[str]) -> Embedded:
        """Embed texts as given; rows keep the order of `texts`.

        What `encode()` does for one batch, without its per-call overhead: the
        worker already hands over length-sorted calls of a few texts. Features
        come from the model's own `preprocess` and go through the model's
        modules (pooling and normalization included), so the vectors are
        encode()'s. The job's prompt is already in the texts (the worker
        prepends it), so no prompt is added here. Token counts come from the
        attention mask; only texts cut at the model's limit are tokenized
        again, untruncated, for their true count.
        """
        import torch
        from sentence_transformers.util import batch_to_device

        batch = list(texts)
        parts = [np.empty((0, self.info.dimensions), dtype=np.float32)]
        counts = np.zeros(len(batch), dtype=np.int64)
        with torch.inference_mode():
            for start in range(0, len(batch), self.batch_size):
                part = batch[start:start + self.batch_size]
                features = batch_to_device(self.model.preprocess(part), self.model.device)
                out = self.model(features)["sentence_embedding"]
                parts.append(out.float().cpu().numpy())
                mask = features.get("attention_mask")
                if mask is not None:
                    counts[start:start + len(part)] = mask.sum(dim=1).cpu().numpy()
        at_limit = [i for i, n in enumerate(counts) if n >= self.info.max_seq_length or n == 0]
        if at_limit:
            counts[at_limit] = self._count_tokens([batch[i] for i in at_limit])
        return Embedded(np.concatenate(parts).astype(np.float32, copy=False), counts)

    def embed_tokens(self, texts: Sequence[str]) -> list[TokenEmbeddings]:
        """Each text's token embeddings and their characters, for late chunking.

        The model's own tokenizer with offsets, then its modules; the Transformer
        module leaves `token_embeddings` in the features (what `encode(...,
        output_value="token_embeddings")` returns). Special and padding tokens
        (no characters) are left out.
        """
        import torch
        from sentence_transformers.util import batch_to_device

        batch = list(texts)
        found: list[TokenEmbeddings] = []
        with torch.inference_mode():
            for start in range(0, len(batch), self.batch_size):
                encoded = self.model.tokenizer(
                    batch[start:start + self.batch_size], padding=True, truncation=True,
                    max_length=self.info.max_seq_length, return_tensors="pt",
                    return_offsets_mapping=True)
                offsets = encoded.pop("offset_mapping").numpy().astype(np.int64)
                features = batch_to_device(dict(encoded), self.model.device)
                out = self.model(features)["token_embeddings"].float().cpu().numpy()
                for row, spans in zip(out, offsets, strict=True):
                    real = spans[:, 1] > spans[:, 0]
                    found.append(TokenEmbeddings(row[real].astype(np.float32), spans[real]))
        return found

    def _count_tokens(self, texts: Sequence[str]) -> np.ndarray[Any, np.dtype[np.int64]]:
        if self._tokenizer is None:
            return np.zeros(len(texts), dtype=np.int64)
        encodings = self._tokenizer.encode_batch(list(texts))
        return np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(texts))


def _counting_tokenizer(tokenizer: Any) -> Any:
    """A copy of the fast tokenizer that neither truncates nor pads, or None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _revision(name: str) -> str | None:
    """A hash of the model's local files (None when they are not local: no cache then)."""
    try:
        return model_revision(model_folder(name))
    except (ExportFailed, OSError):
        return None
