"""Resumable result files for `submit` and `results`: a spool, a state file, the output.

Beside `--out results.npy` live, while the job is followed:

    results.npy.state.json   the job id, the Idempotency-Key, the stream cursor,
                             and how many rows (and meta bytes) the spool holds
    results.npy.part.f32     float32 rows in arrival order
    results.npy.part.jsonl   one line a row: [index, id, truncated, error, extra]

Rows are appended to the spool first and the state is replaced (write, fsync,
rename) after them, so the state never counts a row the spool lacks. A run
killed between the two leaves rows past the state's count: the next run cuts
the spool back to the count and resumes from the state's cursor, whose events
bring those rows again. So every row is in the output exactly once. At the
end the spool is written out in input order (`.npy`: float32, NaN rows for
inputs that failed or were never made; ids beside it in `.ids.txt`;
`.jsonl`: `id`, `index`, `embedding`, `truncated`) and removed.

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
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from embedstream.protocol import Result, Vector

OUTPUT_KINDS = (".npy", ".jsonl")
COPY_ROWS = 65536


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


def jsonl_line(index: int, item_id: str | None, embedding: Vector | None, truncated: bool,
               error: str | None, extra: Mapping[str, object] | None) -> bytes:
    """One line of a `.jsonl` output: `id`, `index`, `embedding`, `truncated` (and `error`)."""
    line: dict[str, object] = {"id": item_id, "index": index,
                               "embedding": None if error else embedding,
                               "truncated": truncated}
    if error:
        line["error"] = error
    line.update(extra or {})
    return orjson.dumps(line, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def output_kind(out: Path) -> str:
    """`.npy` or `.jsonl`, from the output's name (ValueError for anything else)."""
    suffix = out.suffix.lower()
    if suffix not in OUTPUT_KINDS:
        raise ValueError(f"--out must end in .npy or .jsonl, not {out.name!r}")
    return suffix


def ids_path(out: Path) -> Path:
    """Where the ids of a .npy output go: results.npy -> results.ids.txt."""
    return out.with_suffix(".ids.txt")


class Spool:
    """The spool and state files of one output."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.kind = output_kind(out)
        self.state_path = out.with_name(out.name + ".state.json")
        self.vectors_path = out.with_name(out.name + ".part.f32")
        self.meta_path = out.with_name(out.name + ".part.jsonl")
        self._vectors: IO[bytes] | None = None
        self._meta: IO[bytes] | None = None

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
        self._vectors = _open_at(self.vectors_path, state.rows * 4 * (state.dims or 0))
        self._meta = _open_at(self.meta_path, state.meta_bytes)
        self.save(state)

    def append(self, state: State, results: list[Result], cursor: str | None) -> None:
        """Spool rows, then record them and the cursor after them in the state."""
        assert self._vectors is not None and self._meta is not None
        for result in results:
            if state.dims is None and result.embedding is not None:
                state.dims = len(result.embedding)
        dims = state.dims or 0
        meta = bytearray()
        for result in results:
            row = result.embedding if result.embedding is not None and dims else None
            vector = row if row is not None else np.zeros(dims, np.float32)
            self._vectors.write(vector.astype("<f4", copy=False).tobytes())
            meta += orjson.dumps([result.index, result.id, result.truncated, result.error,
                                  result.extra or None],
                                 option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        self._meta.write(meta)
        for handle in (self._vectors, self._meta):
            handle.flush()
            os.fsync(handle.fileno())
        state.rows += len(results)
        state.meta_bytes += len(meta)
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
        order = np.full(total, -1, dtype=np.int64)
        for row, meta in enumerate(metas[:state.rows]):
            if 0 <= meta[0] < total:
                order[meta[0]] = row
        dims = state.dims or 0
        vectors = (np.memmap(self.vectors_path, dtype="<f4", mode="r", shape=(state.rows, dims))
                   if state.rows and dims else np.zeros((0, dims), np.float32))
        if self.kind == ".npy":
            self._write_npy(order, vectors, metas, dims)
        else:
            self._write_jsonl(order, vectors, metas)
        del vectors
        for path in (self.vectors_path, self.meta_path, self.state_path):
            path.unlink(missing_ok=True)
        return int((order < 0).sum())

    def close(self) -> None:
        """Close the spool files (the state stays for a later run)."""
        for handle in (self._vectors, self._meta):
            if handle is not None:
                handle.close()
        self._vectors = self._meta = None

    def _write_npy(self, order: np.ndarray[Any, Any], vectors: np.ndarray[Any, Any],
                   metas: list[Any], dims: int) -> None:
        tmp = self.out.with_name(self.out.name + ".tmp.npy")
        matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                           shape=(len(order), dims))
        for start in range(0, len(order), COPY_ROWS):
            rows = order[start:start + COPY_ROWS]
            block = np.full((len(rows), dims), np.nan, dtype=np.float32)
            made = rows >= 0
            block[made] = vectors[rows[made]]
            for offset in np.flatnonzero(made):  # failed inputs: NaN, not zeros
                if metas[rows[offset]][3] is not None:
                    block[offset] = np.nan
            matrix[start:start + len(rows)] = block
        matrix.flush()
        del matrix
        ids_tmp = self.out.with_name(self.out.name + ".ids.tmp")
        with ids_tmp.open("w", encoding="utf-8") as handle:
            for index, row in enumerate(order):
                found = metas[row][1] if row >= 0 else None
                handle.write(f"{found if found is not None else index}\n")
        os.replace(tmp, self.out)
        os.replace(ids_tmp, ids_path(self.out))

    def _write_jsonl(self, order: np.ndarray[Any, Any], vectors: np.ndarray[Any, Any],
                     metas: list[Any]) -> None:
        tmp = self.out.with_name(self.out.name + ".tmp")
        with tmp.open("wb") as handle:
            for index, row in enumerate(order):
                if row < 0:
                    continue
                _, item_id, truncated, error, extra = metas[row]
                handle.write(jsonl_line(index, item_id, np.asarray(vectors[row]), truncated,
                                        error, extra))
        os.replace(tmp, self.out)


def _open_at(path: Path, size: int) -> IO[bytes]:
    handle = path.open("r+b" if path.exists() else "w+b")
    handle.truncate(size)
    handle.seek(size)
    return handle
