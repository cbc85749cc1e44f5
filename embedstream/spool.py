"""Resumable result files for `submit` and `results`: a spool, a state file, the output.

Beside `--out results.npy` live, while the job is followed:

    results.npy.state.json        the job id, the Idempotency-Key, the stream cursor,
                                  and how many rows (meta bytes, chunk rows) the spool holds
    results.npy.part.f32          float32 rows in arrival order
    results.npy.part.jsonl        one line a row: [index, id, truncated, error, extra, chunks]
    results.npy.part.chunks.f32   with `chunk_output=chunks`: each row's chunk vectors, in
                                  arrival order (`chunks` in its line: [chunking, spans])

Rows are appended to the spool first and the state is replaced (write, fsync,
rename) after them, so the state never counts a row the spool lacks. A run
killed between the two leaves rows past the state's count: the next run cuts
the spool back to the count and resumes from the state's cursor, whose events
bring those rows again. So every row, and every chunk, is in the output
exactly once. At the end the spool is written out in input order
(`embedstream.outputs`) and removed.

One run at a time writes an output: `OutputLock` holds an flock on
`results.npy.lock` (which names the holder's pid) for the whole run, so a
second run on the same `--out` is refused at once instead of racing the
first over the state file. The kernel drops the lock of a killed run, so a
rerun after a crash takes it again.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from embedstream.outputs import OUTPUT_KINDS, Spooled, write_output
from embedstream.protocol import Result


@dataclass
class State:
    """What a resumed run needs: which job, where in its stream, how much is spooled."""

    key: str
    job_id: str | None = None
    cursor: str | None = None
    rows: int = 0
    meta_bytes: int = 0
    dims: int | None = None
    total: int | None = None
    chunk_rows: int = 0


class OutputBusy(Exception):
    """Another run holds the lock of this output."""


class OutputLock:
    """An flock on `<out>.lock`, held by one run of `submit` or `results` at a time."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.with_name(out.name + ".lock")
        self._handle: IO[str] | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = self.path.open("a+", encoding="utf-8")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                pid = handle.read().strip() or "unknown"
                handle.close()
                raise OutputBusy(f"another run is writing {self.out} (pid {pid}); wait for it "
                                 "to end, or choose another --out") from None
            if _is_current(handle, self.path):
                break
            # The holder removed the file as it ended, after we opened it: lock the new one.
            handle.close()
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self.path.unlink(missing_ok=True)  # while still held: no one locks a stale file
            self._handle.close()
            self._handle = None


def _is_current(handle: IO[str], path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), path.stat())
    except FileNotFoundError:
        return False


def output_kind(out: Path) -> str:
    """`.npy` or `.jsonl`, from the output's name (ValueError for anything else)."""
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_KINDS:
        raise ValueError(f"--out must end in .npy or .jsonl, not {out.name!r}")
    return suffix


def meta_line(result: Result) -> bytes:
    """A row's line in the spool: [index, id, truncated, error, extra, chunks]."""
    chunks = None
    if result.chunks is not None:
        chunks = [result.chunking, [[c.start, c.end, c.tokens] for c in result.chunks]]
    return orjson.dumps([result.index, result.id, result.truncated, result.error,
                         result.extra or None, chunks], option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


class Spool:
    """The spool and state files of one output."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.kind = output_kind(out)
        self.state_path = out.with_name(out.name + ".state.json")
        self.vectors_path = out.with_name(out.name + ".part.f32")
        self.meta_path = out.with_name(out.name + ".part.jsonl")
        self.chunks_path = out.with_name(out.name + ".part.chunks.f32")
        self._vectors: IO[bytes] | None = None
        self._meta: IO[bytes] | None = None
        self._chunks: IO[bytes] | None = None

    def load(self, key: str) -> State | None:
        """The saved state for `key`; None when there is none (ValueError: another key's)."""
        if not self.state_path.exists():
            return None
        saved = State(**json.loads(self.state_path.read_text()))
        if saved.key != key:
            raise ValueError(
                f"{self.state_path} belongs to another submission (another file, or other "
                "options); delete it, or choose another --out")
        return saved

    def open(self, state: State) -> None:
        """Open the spool for appending, cut back to what `state` counts."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        row_bytes = 4 * (state.dims or 0)
        self._vectors = _open_at(self.vectors_path, state.rows * row_bytes)
        self._meta = _open_at(self.meta_path, state.meta_bytes)
        self._chunks = _open_at(self.chunks_path, state.chunk_rows * row_bytes)
        self.save(state)

    def append(self, state: State, results: list[Result], cursor: str | None) -> None:
        """Spool rows (and their chunks), then record them and the cursor in the state."""
        assert self._vectors is not None and self._meta is not None and self._chunks is not None
        state.dims = state.dims or _dims_of(results)
        dims = state.dims or 0
        meta = bytearray()
        chunk_rows = 0
        for result in results:
            row = result.embedding if result.embedding is not None and dims else None
            vector = row if row is not None else np.zeros(dims, np.float32)
            self._vectors.write(vector.astype("<f4", copy=False).tobytes())
            for chunk in result.chunks or ():
                self._chunks.write(chunk.embedding.astype("<f4", copy=False).tobytes())
                chunk_rows += 1
            meta += meta_line(result)
        self._meta.write(meta)
        for handle in (self._vectors, self._chunks, self._meta):
            handle.flush()
            os.fsync(handle.fileno())
        state.rows += len(results)
        state.meta_bytes += len(meta)
        state.chunk_rows += chunk_rows
        state.cursor = cursor
        self.save(state)

    def save(self, state: State) -> None:
        """Replace the state file atomically."""
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        with tmp.open("w") as handle:
            json.dump(asdict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.state_path)

    def finish(self, state: State, total: int) -> int:
        """Write the output in input order and remove the spool; returns the rows missing."""
        self.close()
        metas = [orjson.loads(line) for line in self.meta_path.read_bytes().splitlines()]
        dims = state.dims or 0
        spooled = Spooled(metas[:state.rows], total,
                          _rows(self.vectors_path, state.rows, dims),
                          _rows(self.chunks_path, state.chunk_rows, dims))
        write_output(self.out, spooled)
        missing = int((spooled.order < 0).sum())
        del spooled
        for path in (self.vectors_path, self.meta_path, self.chunks_path, self.state_path):
            path.unlink(missing_ok=True)
        return missing

    def close(self) -> None:
        """Close the spool files (the state stays for a later run)."""
        for handle in (self._vectors, self._meta, self._chunks):
            if handle is not None:
                handle.close()
        self._vectors = self._meta = self._chunks = None


def _dims_of(results: list[Result]) -> int | None:
    """The width of the first vector (an input's or a chunk's) among `results`."""
    for result in results:
        if result.embedding is not None:
            return len(result.embedding)
        if result.chunks:
            return len(result.chunks[0].embedding)
    return None


def _rows(path: Path, rows: int, dims: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    """The first `rows` float32 rows of a spool file, mapped (empty when there are none)."""
    if not rows or not dims:
        return np.zeros((0, dims), np.float32)
    return np.memmap(path, dtype="<f4", mode="r", shape=(rows, dims))


def _open_at(path: Path, size: int) -> IO[bytes]:
    handle = path.open("r+b" if path.exists() else "w+b")
    handle.truncate(size)
    handle.seek(size)
    return handle
