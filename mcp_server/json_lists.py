"""A JSON object body whose one long list is decoded a slice at a time.

A job body is mostly one list (`inputs`, or `input` for `/v1/embeddings`).
Parsed whole, a list of small objects costs about 14 times its JSON (a dict,
its keys and values each a Python object the garbage collector then walks),
and orjson holds the GIL for the whole parse: 18.6 MiB of objects took a
server up by 261 MiB and stalled every other request for a second.

So the body is walked once with the standard library's C scanner
(`json.JSONDecoder.raw_decode` returns where a value ends): every other
field is decoded, and the list's elements are counted (past the limit the
walk stops: 413 without reading the rest) and their positions noted, a
mark per `SLICE` elements, without keeping any of them. The elements are
then decoded by orjson a slice at a time as the job's writer takes them,
so a request holds its body's text and one slice, never the tree. The walk
is one short call per element, so run in a thread it leaves the event loop
free between calls (a thread holding the GIL through one long orjson call
does not).

Every value is decoded by orjson in the end, so what is accepted is what
orjson accepts, the same as for small bodies; the walk refuses NaN and
Infinity itself, and the rare value only orjson refuses (a lone surrogate,
an integer past 64 bits) inside the list is refused as the writer reaches it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline import InvalidRequest, PayloadTooLarge

# Elements decoded at once: large enough that orjson's speed shows, small enough
# that a slice of the largest inputs stays a few MiB.
SLICE = 512
_WHITESPACE = re.compile(r"[ \t\n\r]*")


class _NotJson(ValueError):
    """NaN, Infinity or -Infinity, which Python's scanner takes and JSON does not."""


def _refuse(name: str) -> None:
    raise _NotJson(f"{name} is not a JSON value")


_SCANNER = json.JSONDecoder(parse_constant=_refuse)


class TooMany(PayloadTooLarge):
    """The list has more elements than allowed (`limit`); the walk stopped there."""

    def __init__(self, name: str, limit: int) -> None:
        super().__init__(f"'{name}' has more than {limit} items")
        self.limit = limit


@dataclass
class JsonObject:
    """The body's fields, its long list's length, and that list's elements on demand."""

    fields: dict[str, Any]  # every field but the list
    list_name: str
    listed: bool = False  # whether the body has the list (as a JSON array)
    count: int = 0
    text: str = ""
    slices: list[tuple[int, int]] = field(default_factory=list)

    def elements(self) -> Iterator[Any]:
        """The list's elements in order, decoded a slice at a time (taken once)."""
        text, slices = self.text, self.slices
        self.text, self.slices = "", []  # the text goes once the last slice is read
        taken = 0
        for start, end in slices:
            try:
                elements = orjson.loads("[" + text[start:end] + "]")
            except orjson.JSONDecodeError as exc:
                raise InvalidRequest(f"malformed JSON in '{self.list_name}' (an item from "
                                     f"{self.list_name}[{taken}] on): {exc}") from None
            taken += len(elements)
            yield from elements
        del text


def parse_object(raw: bytes | bytearray, list_name: str, limit: int) -> JsonObject:
    """Walk a JSON object; its `list_name` list counted (at most `limit`) and marked."""
    try:
        text = raw.decode()
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"malformed JSON (invalid UTF-8 at byte {exc.start})") from None
    try:
        return _Walk(text, list_name, limit).object()
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"malformed JSON: {exc.msg} at line {exc.lineno} "
                             f"column {exc.colno}") from None
    except (orjson.JSONDecodeError, _NotJson) as exc:
        raise InvalidRequest(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("malformed JSON: nested too deeply") from None


class _Walk:
    def __init__(self, text: str, list_name: str, limit: int) -> None:
        self.text, self.list_name, self.limit = text, list_name, limit

    def _skip(self, at: int) -> int:
        return _WHITESPACE.match(self.text, at).end()  # type: ignore[union-attr]

    def _expect(self, at: int, what: str, name: str) -> None:
        if not self.text.startswith(what, at):
            raise json.JSONDecodeError(f"expected {name}", self.text, at)

    def object(self) -> JsonObject:
        text = self.text
        at = self._skip(0)
        if not text.startswith("{", at):
            _SCANNER.raw_decode(text, at)  # malformed JSON says so before "not an object"
            raise InvalidRequest("the body must be a JSON object")
        body = JsonObject({}, self.list_name, text=text)
        at = self._skip(at + 1)
        if text.startswith("}", at):
            return self._end(body, at)
        while True:
            self._expect(at, '"', "a field name in double quotes")
            key, at = json.decoder.scanstring(text, at + 1)  # type: ignore[attr-defined]
            at = self._skip(at)
            self._expect(at, ":", "':'")
            at = self._skip(at + 1)
            if key == self.list_name and text.startswith("[", at):
                body.fields.pop(key, None)  # of the same field twice, the last counts
                body.count, body.slices, at = self._list(at + 1)
                body.listed = True
            else:
                _, end = _SCANNER.raw_decode(text, at)
                body.fields[key] = orjson.loads(text[at:end])
                if key == self.list_name:
                    body.listed, body.count, body.slices = False, 0, []
                at = end
            at = self._skip(at)
            if text.startswith(",", at):
                at = self._skip(at + 1)
                continue
            self._expect(at, "}", "',' or '}'")
            return self._end(body, at)

    def _end(self, body: JsonObject, at: int) -> JsonObject:
        if self._skip(at + 1) != len(self.text):
            raise json.JSONDecodeError("extra data after the object", self.text, at + 1)
        if not body.slices:
            body.text = ""
        return body

    def _list(self, at: int) -> tuple[int, list[tuple[int, int]], int]:
        """Count and mark the elements of the list opening before `at`; where it ends."""
        text, raw_decode, skip = self.text, _SCANNER.raw_decode, self._skip
        slices: list[tuple[int, int]] = []
        at = skip(at)
        if text.startswith("]", at):
            return 0, slices, at + 1
        count, start = 0, at
        while True:
            _, end = raw_decode(text, at)
            count += 1
            if count > self.limit:
                raise TooMany(self.list_name, self.limit)
            at = skip(end)
            if text.startswith(",", at):
                if count % SLICE == 0:
                    slices.append((start, end))
                    start = skip(at + 1)
                at = skip(at + 1)
                continue
            self._expect(at, "]", "',' or ']'")
            slices.append((start, end))
            return count, slices, at + 1
