"""The files `--out` writes once a job's results are spooled, in input order.

- `.jsonl`: one line an input that was made: `id`, `index`, `embedding`,
  `truncated` (and `error`, and any other field the server sent); with
  `chunk_output=chunks` also `chunks` (`start`, `end`, `tokens`, `embedding`
  each) and `chunking`. Inputs never made have no line.
- `.npy`: float32, one row an input (NaN for an input that failed or was never
  made), its ids in `<name>.ids.txt` (the index where an input has no id). With
  `chunk_output=chunks` also `<name>.chunks.npy`, one float32 row a chunk (each
  input's chunks in order, inputs in order, none for a failed input), and
  `<name>.chunks.jsonl`, its line `i` naming row `i`'s input and span:
  `{"index", "id", "start", "end", "tokens", "chunking"}`.

Each file is written under a temporary name and moved into place, so a
reader never sees half of one; a run killed while writing them leaves its
spool, and the next run writes them again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from embedstream.protocol import Chunk, Result

OUTPUT_KINDS = (".npy", ".jsonl")
COPY_ROWS = 65536
META_FIELDS = 6  # index, id, truncated, error, extra, chunks

FloatRows = np.ndarray[Any, np.dtype[np.float32]]
IntVector = np.ndarray[Any, np.dtype[np.int64]]


class Spooled:
    """A finished spool read back: its rows in arrival order, and where each input's went.

    `metas` holds each spooled row's line (see `embedstream.spool`); `vectors`
    its vector and `pieces` the rows' chunk vectors, each row's after the
    rows before it.
    """

    def __init__(self, metas: list[list[Any]], total: int, vectors: FloatRows,
                 pieces: FloatRows) -> None:
        # A spool begun before chunk output existed has five fields a line.
        self.metas = [meta + [None] * (META_FIELDS - len(meta)) for meta in metas]
        self.vectors = vectors
        self.pieces = pieces
        self.order = np.full(total, -1, dtype=np.int64)  # per input, its spooled row or -1
        for row, meta in enumerate(self.metas):
            if 0 <= meta[0] < total:
                self.order[meta[0]] = row
        self.sizes = np.array([len(meta[5][1]) if meta[5] else 0 for meta in self.metas],
                              dtype=np.int64)
        self.firsts = np.cumsum(self.sizes) - self.sizes  # per spooled row, its first chunk

    @property
    def chunked(self) -> bool:
        """Whether the job returned chunks (`chunk_output=chunks`)."""
        return any(meta[5] is not None for meta in self.metas)

    def result(self, row: int) -> Result:
        """Spooled row `row` as the Result it came from."""
        index, item_id, truncated, error, extra, chunked = self.metas[row]
        chunks, chunking = None, None
        if chunked is not None:
            chunking, spans = chunked
            first = int(self.firsts[row])
            chunks = tuple(Chunk(start, end, tokens, np.asarray(self.pieces[first + i]))
                           for i, (start, end, tokens) in enumerate(spans))
        return Result(index, item_id, np.asarray(self.vectors[row]), truncated, error,
                      extra or {}, chunks, chunking)

    def chunk_order(self) -> IntVector:
        """The spooled chunk rows in output order: inputs in order, each one's chunks."""
        made = self.order[self.order >= 0]
        sizes, firsts = self.sizes[made], self.firsts[made]
        placed = np.cumsum(sizes) - sizes
        shifts: IntVector = np.repeat(firsts - placed, sizes)
        return np.arange(int(sizes.sum()), dtype=np.int64) + shifts


def jsonl_line(result: Result) -> bytes:
    """One line of a `.jsonl` output: `id`, `index`, `embedding`, `truncated` (and `error`,
    any other field, and with chunk output `chunks` and `chunking`)."""
    line: dict[str, object] = {"id": result.id, "index": result.index,
                               "embedding": None if result.error else result.embedding,
                               "truncated": result.truncated}
    if result.error:
        line["error"] = result.error
    line.update(result.extra)
    if result.chunks is not None:
        line["chunks"] = [{"start": c.start, "end": c.end, "tokens": c.tokens,
                           "embedding": c.embedding} for c in result.chunks]
        line["chunking"] = result.chunking
    return orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def ids_path(out: Path) -> Path:
    """Where the ids of a .npy output go: results.npy -> results.ids.txt."""
    return out.with_suffix(".ids.txt")


def chunk_paths(out: Path) -> tuple[Path, Path]:
    """Where a .npy output's chunks go: results.chunks.npy and results.chunks.jsonl."""
    return out.with_suffix(".chunks.npy"), out.with_suffix(".chunks.jsonl")


def write_output(out: Path, spooled: Spooled) -> None:
    """Write `out` (and the files beside it) from a finished spool."""
    if out.suffix.lower() == ".jsonl":
        _replace(out, _jsonl_lines(spooled))
        return
    if spooled.chunked:
        vectors, spans = chunk_paths(out)
        _write_matrix(vectors, spooled.pieces, spooled.chunk_order(), np.zeros(0, bool))
        _replace(spans, _span_lines(spooled))
    failed = np.array([meta[3] is not None for meta in spooled.metas], dtype=bool)
    _write_matrix(out, spooled.vectors, spooled.order, failed)
    _replace(ids_path(out), _id_lines(spooled))


def _jsonl_lines(spooled: Spooled) -> Iterator[bytes]:
    for row in spooled.order:
        if row >= 0:
            yield jsonl_line(spooled.result(int(row)))


def _span_lines(spooled: Spooled) -> Iterator[bytes]:
    """A line for each row of `.chunks.npy`: its input and its characters in it."""
    for row in spooled.order[spooled.order >= 0]:
        index, item_id, _, _, _, chunked = spooled.metas[row]
        if not chunked:
            continue
        chunking, spans = chunked
        for start, end, tokens in spans:
            yield orjson.dumps({"index": index, "id": item_id, "start": start, "end": end,
                                "tokens": tokens, "chunking": chunking}) + b"\n"


def _id_lines(spooled: Spooled) -> Iterator[bytes]:
    for index, row in enumerate(spooled.order):
        found = spooled.metas[row][1] if row >= 0 else None
        yield f"{found if found is not None else index}\n".encode()


def _write_matrix(path: Path, rows: FloatRows, order: IntVector, failed: np.ndarray[Any, Any]
                  ) -> None:
    """`rows` in `order` as a float32 .npy; NaN where `order` is -1 or the row `failed`."""
    tmp = path.with_name(path.name + ".tmp.npy")
    dims = rows.shape[1]
    matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                       shape=(len(order), dims))
    for start in range(0, len(order), COPY_ROWS):
        picked = order[start:start + COPY_ROWS]
        block = np.full((len(picked), dims), np.nan, dtype=np.float32)
        made = picked >= 0
        if failed.size:  # failed inputs: NaN, not the zeros spooled for them
            made[made] = ~failed[picked[made]]
        block[made] = rows[picked[made]]
        matrix[start:start + len(picked)] = block
    matrix.flush()
    del matrix
    os.replace(tmp, path)


def _replace(path: Path, lines: Iterator[bytes]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        for line in lines:
            handle.write(line)
    os.replace(tmp, path)

