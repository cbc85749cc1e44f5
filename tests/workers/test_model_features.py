"""Real models through the queue: long texts in windows, prompts, and two models at once.

The second and third models are tiny, randomly initialized BERTs built and
saved with sentence-transformers in the test itself (the bundled model's
tokenizer, no download), so each is checked against its own
`SentenceTransformer.encode`.
"""

from __future__ import annotations

import asyncio
import csv
import shutil
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from pipeline.errors import UnknownModel
from pipeline.inputs import Item, JobOptions
from pipeline.model.info import DEFAULT_MODEL, bundled_model_dir, describe_local_model
from pipeline.model.torch_backend import SentenceTransformerEmbedder
from pipeline.service import Pipeline
from pipeline.settings import Settings
from tests.support.sts_data import STS_DEV
from tests.support.workers import Running, all_rows, running, wait_end

pytestmark = pytest.mark.anyio

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json",
                   "special_tokens_map.json")
PROMPTS = {"query": "query: ", "passage": "passage: "}
TEXTS = ["a cat sits on the mat", "dogs bark at night", "the stock market fell sharply"]


def build_tiny_model(folder: Path, hidden: int, seed: int) -> Path:
    """A random BERT with mean pooling and two prompts, saved as a sentence-transformers model."""
    import torch
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=128)
    BertModel(config).save_pretrained(folder / "hf")
    for name in TOKENIZER_FILES:
        shutil.copy(bundled_model_dir() / name, folder / "hf" / name)
    model = SentenceTransformer(
        modules=[Transformer(str(folder / "hf"), max_seq_length=64), Pooling(hidden, "mean")],
        prompts=PROMPTS, device="cpu")
    model.save(str(folder / "st"))
    return (folder / "st").resolve()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return build_tiny_model(root / "a", 32, 1), build_tiny_model(root / "b", 48, 2)


@pytest.fixture
def fast_settings(fast_settings: Settings) -> Settings:
    """The shared fast settings, with batches of 64 texts."""
    return fast_settings.replace(batch_max_texts=64)


def embedder_for(settings: Settings, model: Path | str) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(settings.replace(model=str(model), device="cpu"))


async def embed(pipeline: Pipeline, texts: list[str], **options: Any) -> list[dict[str, Any]]:
    job = await pipeline.submit([Item(t) for t in texts], JobOptions(**options))
    end = await wait_end(pipeline, job.id, timeout_s=60)
    assert end["status"] == "completed", end
    return await all_rows(pipeline, job.id)


def matrix(rows: list[dict[str, Any]]) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.vstack([np.asarray(row["embedding"], dtype=np.float32) for row in rows])


# Prompts


async def test_prompt_name_and_prompt_change_vectors_as_encode_does(
    fast_settings: Settings, pipeline: Pipeline, tiny_models: tuple[Path, Path]
) -> None:
    model_path = tiny_models[0]
    reference = SentenceTransformer(str(model_path), device="cpu")
    async with running(fast_settings, embedder_for(fast_settings, model_path)):
        model = str(model_path)
        for options, expected in [
            ({"prompt_name": "query"}, reference.encode(TEXTS, prompt_name="query")),
            ({"prompt_name": "passage"}, reference.encode(TEXTS, prompt_name="passage")),
            ({"prompt": "Represent this: "}, reference.encode(TEXTS, prompt="Represent this: ")),
            ({}, reference.encode(TEXTS)),
        ]:
            rows = await embed(pipeline, TEXTS, model=model, normalize=False, **options)
            assert np.allclose(matrix(rows), expected, atol=1e-5), options
        plain = await embed(pipeline, TEXTS, model=model, normalize=False)
        queried = await embed(pipeline, TEXTS, model=model, normalize=False, prompt_name="query")
        assert not np.allclose(matrix(plain), matrix(queried), atol=1e-3)
        [served] = await pipeline.models()
        assert served.prompts["query"] == "query: " and served.backend == "torch"
        # What the server reads from the files agrees with what the loaded model says.
        described = describe_local_model(model)
        assert described is not None
        assert (described.max_seq_length, described.dimensions) == (64, 32) == (
            served.max_seq_length, served.dimensions)
        assert described.prompts == served.prompts
        with pytest.raises(Exception, match="'passage', 'query'"):
            await pipeline.submit([Item("x")], JobOptions(model=model, prompt_name="nope"))


# Several models at once


async def test_two_models_are_served_side_by_side_and_one_dying_spares_the_other(
    fast_settings: Settings, pipeline: Pipeline, tiny_models: tuple[Path, Path]
) -> None:
    path_a, path_b = tiny_models
    ref_a = SentenceTransformer(str(path_a), device="cpu")
    ref_b = SentenceTransformer(str(path_b), device="cpu")
    # Heartbeats with room to spare: on a loaded machine a 1 s TTL lapses and a
    # live worker's model drops out of the listing.
    fast_settings = fast_settings.replace(heartbeat_ttl_s=3.0, visibility_timeout_s=5.0)
    async with running(fast_settings, embedder_for(fast_settings, path_a)) as worker_a, \
            running(fast_settings, embedder_for(fast_settings, path_b)):
        listed = {model.name: model for model in await pipeline.models()}
        assert set(listed) == {str(path_a), str(path_b)}
        assert (listed[str(path_a)].dimensions, listed[str(path_b)].dimensions) == (32, 48)
        rows_a, rows_b = await asyncio.gather(
            embed(pipeline, TEXTS, model=str(path_a)),
            embed(pipeline, TEXTS, model=str(path_b)))
        assert np.allclose(matrix(rows_a), ref_a.encode(TEXTS, normalize_embeddings=True),
                           atol=1e-5)
        assert np.allclose(matrix(rows_b), ref_b.encode(TEXTS, normalize_embeddings=True),
                           atol=1e-5)
        await kill_and_wait_gone(worker_a, pipeline, str(path_a))
        rows_b = await embed(pipeline, TEXTS[::-1], model=str(path_b))
        assert np.allclose(matrix(rows_b), ref_b.encode(TEXTS[::-1], normalize_embeddings=True),
                           atol=1e-5)
        with pytest.raises(UnknownModel) as refused:
            await pipeline.submit([Item("x")], JobOptions(model=str(path_a)))
        assert str(path_b) in refused.value.message and refused.value.status == 422


async def kill_and_wait_gone(worker: Running, pipeline: Pipeline, model: str) -> None:
    """kill the worker (no goodbye) and wait until its heartbeat has expired."""
    await worker.kill()
    with anyio.fail_after(10):
        while model in {m.name for m in await pipeline.models()}:
            await anyio.sleep(0.05)


# Long inputs, with the real model


def long_text(words: int) -> str:
    """STS-B dev sentences joined until the text has `words` words."""
    picked: list[str] = []
    with STS_DEV.open(encoding="utf-8") as handle:
        for row in csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            picked.extend(row[5].split())
            if len(picked) >= words:
                break
    return " ".join(picked[:words])


def reference_windows(model: SentenceTransformer, text: str, overlap: int) -> tuple[Any, Any]:
    """(window vectors, token weights) computed here with the model's own tokenizer."""
    from tokenizers import Tokenizer

    counting = Tokenizer.from_str(model.tokenizer.backend_tokenizer.to_str())
    counting.no_truncation()
    offsets = counting.encode(text, add_special_tokens=False).offsets
    budget = model.max_seq_length - 2  # [CLS] and [SEP]
    windows, weights = [], []
    start = 0
    while True:
        end = min(start + budget, len(offsets))
        windows.append(text[offsets[start][0]:offsets[end - 1][1]])
        weights.append(end - start)
        if end == len(offsets):
            break
        start += budget - overlap
    return model.encode(windows), np.asarray(weights, dtype=np.float64)


@pytest.mark.slow
async def test_a_long_text_is_the_token_weighted_mean_of_its_windows(
    fast_settings: Settings, pipeline: Pipeline
) -> None:
    reference = SentenceTransformer(str(bundled_model_dir()), device="cpu")
    text = long_text(2000)
    async with running(fast_settings, embedder_for(fast_settings, DEFAULT_MODEL)):
        rows = await embed(pipeline, [text, "a short sentence"], chunk=True)
        overlapped = await embed(pipeline, [text], chunk=True, chunk_overlap=64)
        cut = await embed(pipeline, [text])
    for row, overlap in [(rows[0], 32), (overlapped[0], 64)]:
        vectors, weights = reference_windows(reference, text, overlap)
        mean = (weights[:, None] * vectors).sum(axis=0) / weights.sum()
        got = np.asarray(row["embedding"], dtype=np.float64)
        cosine = float(got @ mean / (np.linalg.norm(got) * np.linalg.norm(mean)))
        assert cosine >= 0.99999, (overlap, cosine)
        assert row["chunks"] == len(weights) >= 9 and not row["truncated"]
    assert rows[1]["chunks"] == 1
    assert np.allclose(rows[1]["embedding"], reference.encode("a short sentence"), atol=1e-5)
    assert cut[0]["truncated"] and "chunks" not in cut[0]
