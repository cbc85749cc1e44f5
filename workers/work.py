"""Queue entries and the work they carry: what a worker claims and embeds.

An `Entry` is one claimed queue entry: a job's chunk, or an interactive
request that carries its texts inline. `Work` is a chunk's texts and its
job's options, with the vectors once embedded. `Attempt` is what a
redelivered chunk's last delivery recorded (see `workers.batch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson

from pipeline import tracing
from pipeline.model import ChunkSpec, Plan, plan_chunks, plan_texts

if TYPE_CHECKING:
    from pipeline.model import Embedded, ModelInfo


@dataclass(frozen=True)
class Attempt:
    """What the last delivery of a chunk recorded: the input in hand, and inputs given up."""

    trying: int | None
    given_up: frozenset[int] = frozenset()
    worker: str = ""  # who wrote it: a death is blamed only if that worker is gone

    @classmethod
    def parse(cls, raw: bytes | None) -> Attempt | None:
        """The stored record, or None when there is none (or it is unreadable)."""
        if raw is None:
            return None
        try:
            data = orjson.loads(raw)
            trying = data["trying"]
            return cls(None if trying is None else int(trying),
                       frozenset(int(i) for i in data["given_up"]), str(data.get("worker", "")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    def dump(self) -> bytes:
        """The record as stored: JSON of the input in hand, the inputs given up, the writer."""
        return orjson.dumps({"trying": self.trying, "given_up": sorted(self.given_up),
                             "worker": self.worker})

    def survived(self) -> Attempt:
        """The record of an attempt whose worker did not die (it lost Redis, say)."""
        return Attempt(None, self.given_up, self.worker)

    @property
    def suspects(self) -> frozenset[int]:
        """Inputs not to try again: those given up, and the one a death interrupted."""
        return self.given_up | ({self.trying} if self.trying is not None else set())


@dataclass(frozen=True)
class Entry:
    """One claimed queue entry: a chunk of a job."""

    stream: str
    entry_id: bytes
    job_id: str
    chunk: int
    size: int = 1
    deliveries: int = 1  # times the queue handed it out, this one included
    # An interactive request's (inputs, options): it carries its texts (workers.replies).
    request: tuple[bytes, bytes] | None = None
    # The inbox (server id) its reply goes to; "" for an older server's request.
    reply_to: str = ""
    # The W3C traceparent of its submit span; "" unless tracing was on (`pipeline.tracing`).
    traceparent: str = ""


@dataclass
class Work:
    """A chunk to embed, with its texts and its job's options."""

    entry: Entry
    texts: list[str]
    ids: list[str | None]
    normalize: bool
    dimensions: int | None
    prompt: str = ""
    chunk: bool = False
    chunk_overlap: int = 0
    # The job's or request's owner ("": the trusted caller): the tenant cache scope's key.
    owner: str = ""
    # With `chunk_output: "chunks"`: how chunks are cut and embedded; None: pooled only.
    spec: ChunkSpec | None = None
    chunking: str = "separate"
    vectors: np.ndarray[Any, np.dtype[np.float32]] | None = None
    tokens: np.ndarray[Any, np.dtype[np.int64]] | None = None
    longest: np.ndarray[Any, np.dtype[np.int64]] | None = None
    errors: dict[int, str] = field(default_factory=dict)
    plan: Plan | None = None
    # The plan's raw rows (a chunk's vector each), kept with `spec` for per-chunk output.
    rows: np.ndarray[Any, np.dtype[np.float32]] | None = None

    def planned(self, model: ModelInfo) -> Plan:
        """What the model embeds for this chunk: prompted texts, or their windows."""
        if self.plan is None and self.spec is not None:
            self.plan = plan_chunks(self.texts, self.prompt, self.spec,
                                    overlap=self.chunk_overlap, model=model.name,
                                    max_seq_length=model.max_seq_length)
        if self.plan is None:
            self.plan = plan_texts(self.texts, self.prompt, chunk=self.chunk,
                                   overlap=self.chunk_overlap, model=model.name,
                                   max_seq_length=model.max_seq_length)
        return self.plan

    def take(self, plan: Plan, embedded: Embedded) -> None:
        """Keep the embedded model texts, pooled back to one raw vector per input."""
        if self.spec is not None:
            self.rows = embedded.vectors
        self.vectors, self.tokens, self.longest = plan.pool(embedded.vectors,
                                                            embedded.token_counts)


def parse_reply(reply: Any) -> list[Entry]:
    """The entries of an XREADGROUP reply, less those deleted or not ours to read."""
    entries: list[Entry] = []
    for stream, items in reply or ():
        name = stream.decode() if isinstance(stream, bytes) else stream
        for entry_id, fields in items:
            entry = parse_entry(name, entry_id, fields)
            if entry is not None:
                entries.append(entry)
    return entries


def parse_entry(stream: str, entry_id: bytes, fields: dict[bytes, bytes] | None) -> Entry | None:
    """A queue entry, or None when it was deleted or is not ours to read."""
    if fields and b"req" in fields:
        return parse_request(stream, entry_id, fields)
    if not fields or b"job" not in fields or b"chunk" not in fields:
        return None
    try:
        size = int(fields.get(b"n", b"1"))
        return Entry(stream, entry_id, fields[b"job"].decode(), int(fields[b"chunk"]), size,
                     traceparent=tracing.entry_traceparent(fields))
    except ValueError:
        return None


def parse_request(stream: str, entry_id: bytes, fields: dict[bytes, bytes]) -> Entry | None:
    """An interactive request's entry (`pipeline.jobs.interactive`), or None when malformed."""
    try:
        size = int(fields.get(b"n", b"1"))
        return Entry(stream, entry_id, fields[b"req"].decode(), 0, size,
                     request=(fields[b"inputs"], fields[b"options"]),
                     reply_to=fields.get(b"inbox", b"").decode(),
                     traceparent=tracing.entry_traceparent(fields))
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


def request_work(entry: Entry) -> Work:
    """A request's texts and options, as a job's chunk would carry them (no read needed)."""
    assert entry.request is not None
    data = orjson.loads(entry.request[0])
    options = orjson.loads(entry.request[1])
    dims, model_dims = int(options["dimensions"]), int(options["model_dimensions"])
    return Work(entry, data["texts"], data["ids"], normalize=bool(options["normalize"]),
                dimensions=dims if dims < model_dims else None,
                prompt=str(options.get("prompt") or ""), chunk=bool(options.get("chunk")),
                chunk_overlap=int(options.get("chunk_overlap") or 0),
                owner=str(options.get("owner") or ""),
                spec=chunk_spec(str(options.get("chunk_output") or "pooled"),
                                str(options.get("chunking") or "separate"),
                                int(options.get("chunk_tokens") or 0),
                                str(options.get("chunk_boundary") or "tokens")),
                chunking=str(options.get("chunking") or "separate"))


def chunk_spec(output: str, chunking: str, size: int, boundary: str) -> ChunkSpec | None:
    """How a job's chunks are cut and embedded, or None when it wants pooled vectors only."""
    if output != "chunks":
        return None
    return ChunkSpec(late=chunking == "late", size=size, sentences=boundary == "sentence")
