"""Delivery precision: float32 as stored, base64, float16, or quantized integers, per read.

Vectors are stored as float32 once; every read picks its `encoding`, so one
job can be read at any precision. The integer encodings compute exactly what
sentence-transformers' `quantize_embeddings` computes (re-implemented here
in numpy because the server never imports torch):

- `int8`/`uint8`: per dimension, `floor((x - min) / ((max - min) / 255))`
  clipped to 0..255 (minus 128 for int8). The ranges belong to the model:
  a worker embeds the calibration corpus shipped in `pipeline/data/` once and
  records the raw vectors in Redis (`SET NX`: the first worker's vectors win,
  so every worker and every server uses the same ones, run after run). The
  ranges for a job are the per-dimension min and max of those vectors shaped
  as the job's are (`dimensions`, `normalize`), so they fit its vectors.
- `binary`/`ubinary`: the sign bits (`x > 0`) packed 8 to a byte, as signed
  (minus 128) or unsigned bytes.
- `float16`: base64 of little-endian IEEE half floats, never JSON numbers
  (printed shortest, a 384-dim half vector is still about 3 KB of JSON, three
  times its base64, it costs per-float Python work, and it is read back as
  float64 anyway). Values beyond float16's range are clipped to +-65504, its
  largest finite value, so a vector never holds inf: normalized vectors never
  come near it (|x| <= 1), and a clipped value stays finite and of the right
  sign, as the int8 scaling clips too.
"""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import InvalidRequest, PipelineError, Unavailable
from pipeline.model.embedder import shape_vectors

if TYPE_CHECKING:
    from pipeline.jobs.record import JobRecord
    from pipeline.keys import Keys
    from pipeline.store.connections import RedisClient

FloatMatrix = np.ndarray[Any, np.dtype[np.float32]]
ENCODINGS = ("float", "base64", "float16", "int8", "uint8", "binary", "ubinary")
CALIBRATED = ("int8", "uint8")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
CALIBRATION_FILE = Path(__file__).parents[1] / "data" / "calibration.txt"


def check_encoding(
    value: object, name: str = "'encoding'", *, error: type[PipelineError] = InvalidRequest
) -> str:
    """The encoding asked for (float when unset), or `error` naming `name` and the choices."""
    if value is None or value == "":
        return "float"
    if not isinstance(value, str) or value not in ENCODINGS:
        raise error(f"{name} must be one of {', '.join(ENCODINGS)}; got {str(value)[:40]!r}")
    return value


@functools.cache
def calibration_texts() -> tuple[str, ...]:
    """The fixed calibration corpus (one sentence a line) shipped with embedstream."""
    lines = CALIBRATION_FILE.read_text(encoding="utf-8").splitlines()
    return tuple(line for line in lines if line.strip())


def ranges_from(calibration: FloatMatrix, dimensions: int | None, normalize: bool) -> FloatMatrix:
    """Per-dimension (min, max) of the calibration vectors shaped like a job's vectors."""
    shaped = shape_vectors(calibration, dimensions, normalize)
    return np.vstack([shaped.min(axis=0), shaped.max(axis=0)]).astype(np.float32)


def half_floats(vectors: FloatMatrix) -> np.ndarray[Any, np.dtype[np.float16]]:
    """Rows as little-endian float16, clipped to its finite range (no inf, no overflow warning)."""
    return np.clip(vectors, -FLOAT16_MAX, FLOAT16_MAX).astype("<f2")


def base64_rows(rows: np.ndarray[Any, Any]) -> list[Any]:
    """Each row's bytes as a base64 string."""
    return [base64.b64encode(row.tobytes()).decode() for row in rows]


def quantize(vectors: FloatMatrix, encoding: str, ranges: FloatMatrix | None = None) -> Any:
    """The integer form of float32 rows, as `quantize_embeddings` makes it."""
    if encoding in CALIBRATED:
        assert ranges is not None, "int8/uint8 need the model's ranges"
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        values = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return values.astype(np.uint8) if encoding == "uint8" else (values - 128).astype(np.int8)
    packed = np.packbits(vectors > 0, axis=-1)
    return packed if encoding == "ubinary" else (packed - 128).astype(np.int8)


@dataclass(frozen=True)
class VectorView:
    """How stored float32 rows are delivered: an encoding, and ranges when it needs them."""

    encoding: str = "float"
    ranges: FloatMatrix | None = None

    def encode(self, vectors: FloatMatrix) -> list[Any]:
        """One JSON-able value per row (numpy rows are serialized by orjson)."""
        if self.encoding == "float":
            return list(vectors)
        if self.encoding == "base64":
            return base64_rows(vectors.astype("<f4", copy=False))
        if self.encoding == "float16":
            return base64_rows(half_floats(vectors))
        return list(quantize(vectors, self.encoding, self.ranges))


FLOAT = VectorView()


async def store_calibration(
    redis: RedisClient, keys: Keys, model: str, vectors: FloatMatrix
) -> bool:
    """Record a model's calibration vectors unless some worker already did; True if ours won."""
    return bool(await redis.set(keys.calibration(model),
                                vectors.astype("<f4", copy=False).tobytes(), nx=True))


async def has_calibration(redis: RedisClient, keys: Keys, model: str) -> bool:
    """Whether the model's calibration vectors are recorded."""
    return bool(await redis.exists(keys.calibration(model)))


async def load_calibration(
    redis: RedisClient, keys: Keys, model: str, model_dimensions: int
) -> FloatMatrix:
    """The model's recorded calibration vectors, or Unavailable if no worker recorded them."""
    raw = await redis.get(keys.calibration(model))
    if raw is None:
        raise Unavailable(f"no int8/uint8 ranges are recorded for {model} yet: a worker serving "
                          "it records them when it starts; start one, or read as float")
    return np.frombuffer(raw, dtype="<f4").reshape(-1, model_dimensions)


class Views:
    """Builds VectorViews for jobs, caching each model's calibration vectors in memory.

    The recorded vectors never change once written (SET NX), so caching them
    for the life of the process is safe.
    """

    def __init__(self, redis: RedisClient, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._calibration: dict[str, FloatMatrix] = {}

    async def for_job(self, encoding: str, record: JobRecord) -> VectorView:
        """The view of `encoding` for the job whose record is given."""
        return await self.for_shape(encoding, record.model, record.model_dimensions,
                                    record.output_dimensions, record.normalize)

    async def for_shape(self, encoding: str, model: str, model_dimensions: int,
                        output_dimensions: int | None, normalize: bool) -> VectorView:
        """The view of `encoding` for vectors of this model, cut and normalized so."""
        if encoding not in CALIBRATED:
            return VectorView(encoding)
        calibration = self._calibration.get(model)
        if calibration is None:
            calibration = await load_calibration(self.redis, self.keys, model,
                                                 model_dimensions)
            self._calibration[model] = calibration
        return VectorView(encoding, ranges_from(calibration, output_dimensions, normalize))
