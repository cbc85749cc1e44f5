"""A model's local files: where they are, and a hash of them (its revision).

The revision names ONNX exports and cache entries, so a changed model never
reuses what an older one made.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.model.info import canonical_model_name, model_source

_SKIPPED_FILES = {"README.md", ".gitattributes"}
_SKIPPED_DIRS = {"onnx", "openvino", ".git", ".cache"}


class ExportFailed(RuntimeError):
    """The model could not be exported to ONNX (the worker falls back to torch)."""


def model_folder(name: str) -> Path:
    """The local folder of a model's files (a hub model must be in the local cache)."""
    source = Path(model_source(name))
    if source.is_dir():
        return source
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(canonical_model_name(name), local_files_only=True))
    except Exception as exc:  # any hub error: not cached, bad name
        raise ExportFailed(f"model {name!r} has no local files to export: {exc}") from exc


def model_revision(folder: Path) -> str:
    """A hash of the model's files (names and contents): the export's revision."""
    digest = hashlib.sha256()
    for path in sorted(_model_files(folder)):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def _model_files(folder: Path) -> Iterator[Path]:
    for path in folder.rglob("*"):
        parts = set(path.relative_to(folder).parts)
        if (path.is_file() and path.name not in _SKIPPED_FILES and not parts & _SKIPPED_DIRS
                and path.suffix != ".onnx"):
            yield path


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created with its folder), for work peers must not repeat."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomically(target: Path, write: Callable[[Path], object]) -> None:
    """`write` a temporary file beside `target`, then move it into place: never half-written."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o644)  # mkstemp makes it private; other users' workers read it too
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
