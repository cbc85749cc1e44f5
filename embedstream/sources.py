"""Reading the inputs of `embedstream submit`: .txt, .jsonl, .csv, .tsv, or stdin.

Each reader yields inputs one at a time (a string, or an `{id, text,
metadata}` dict) from a file opened in text mode, so a file of any size is
streamed, never held whole. Blank lines of .txt and .jsonl are skipped, as
the server skips blank NDJSON lines; a row's number in an error is its line
in the file.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

FORMATS = ("txt", "jsonl", "csv", "tsv")
EXTENSIONS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
              ".csv": "csv", ".tsv": "tsv"}


class SourceError(ValueError):
    """The input file cannot be read as asked (a bad line, a missing column)."""


@dataclass(frozen=True)
class Source:
    """Where inputs come from and how to read them."""

    path: str  # "-" for stdin
    format: str
    column: str | None = None
    id_column: str | None = None

    @property
    def is_stdin(self) -> bool:
        return self.path == "-"

    def open(self) -> contextlib.AbstractContextManager[IO[str]]:
        """The file as text; stdin as it is (not closed afterwards)."""
        if self.is_stdin:
            return contextlib.nullcontext(sys.stdin)
        return open(self.path, encoding="utf-8", newline="")

    def inputs(self) -> Iterator[Any]:
        """The inputs, one at a time."""
        with self.open() as handle:
            yield from READERS[self.format](handle, self)


def detect_format(path: str, given: str | None) -> str:
    """The format named by `--format`, else by the file's extension (stdin: txt)."""
    if given:
        if given not in FORMATS:
            raise SourceError(f"unknown --format {given!r}; use one of {', '.join(FORMATS)}")
        return given
    if path == "-":
        return "txt"
    suffix = Path(path).suffix.lower()
    if suffix not in EXTENSIONS:
        raise SourceError(f"cannot tell the format of {path!r} from its extension; "
                          f"pass --format ({', '.join(FORMATS)})")
    return EXTENSIONS[suffix]


def read_txt(handle: IO[str], source: Source) -> Iterator[Any]:
    """A text a line (the line ending is not part of it)."""
    for line in handle:
        text = line.rstrip("\r\n")
        if text.strip():
            yield text


def read_jsonl(handle: IO[str], source: Source) -> Iterator[Any]:
    """A JSON string, or an object with `text` (and `id`, `metadata`), a line."""
    for line_no, line in enumerate(handle, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{source.path} line {line_no}: not JSON ({exc.msg})") from None
        if isinstance(value, dict) and source.column and source.column != "text":
            value = _renamed(value, source, line_no)
        if not isinstance(value, str | dict):
            raise SourceError(f"{source.path} line {line_no}: expected a JSON string or an "
                              "object with 'text'")
        yield value


def _renamed(value: dict[str, Any], source: Source, line_no: int) -> dict[str, Any]:
    if source.column not in value:
        raise SourceError(f"{source.path} line {line_no}: no field {source.column!r}")
    item: dict[str, Any] = {"text": value[source.column]}
    id_field = source.id_column or "id"
    if id_field in value:
        item["id"] = value[id_field]
    if "metadata" in value:
        item["metadata"] = value["metadata"]
    return item


def read_table(handle: IO[str], source: Source) -> Iterator[Any]:
    """CSV or TSV with a header row: the text from `--column` (default `text`),
    the id from `--id-column`; the other columns become the input's metadata."""
    reader = csv.DictReader(handle, delimiter="\t" if source.format == "tsv" else ",")
    header = reader.fieldnames or []
    column = source.column or ("text" if "text" in header else (header[0] if header else ""))
    for name in (column, source.id_column):
        if name is not None and name not in header:
            raise SourceError(f"{source.path}: no column {name!r} (the header has "
                              f"{', '.join(map(repr, header)) or 'no columns'}); "
                              "pick one with --column / --id-column")
    for row in reader:
        text = row.get(column) or ""
        if not text.strip():
            continue
        item: dict[str, Any] = {"text": text}
        if source.id_column:
            item["id"] = row[source.id_column]
        metadata = {k: v for k, v in row.items()
                    if k not in (column, source.id_column) and k is not None}
        if metadata:
            item["metadata"] = metadata
        yield item


READERS = {"txt": read_txt, "jsonl": read_jsonl, "csv": read_table, "tsv": read_table}
