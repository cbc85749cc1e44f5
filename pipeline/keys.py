"""Every Redis key and stream name embedstream uses, built in this one module.

All keys of one job share the hash tag `{<job_id>}` so that the commit script,
which touches several of them at once, also runs on Redis Cluster. The two
lanes of one model's queue share the tag `{q:<model>}` because one XREADGROUP
reads both.

    <p>:{<job>}:job        hash    status, counters, options, timestamps
    <p>:{<job>}:inputs     hash    chunk number -> packed inputs of that chunk
    <p>:{<job>}:vectors    hash    v:<chunk> float32 bytes, m:<chunk> meta; m: is the done marker
    <p>:{<job>}:events     stream  result / end events of the job (SSE source)
    <p>:{<job>}:attempt:<chunk>  string  the input of a redelivered chunk being embedded
                                         alone, so a crash names it (expires)
    <p>:{q:<model>}:fast   stream  chunks of small jobs (the fast lane)
    <p>:{q:<model>}:bulk   stream  chunks of large jobs (partition 0 of the bulk lane)
    <p>:{q:<model>:<k>:<salt>}:bulk  stream  bulk partition k > 0, on its own slot
                                   (EMBEDSTREAM_QUEUE_PARTITIONS; see QueueLayout)
    <p>:feed               stream  lifecycle events for dashboards (capped)
    <p>:workers            hash    worker id -> worker description
    <p>:worker:<id>        string  heartbeat, expires when the worker dies
    <p>:models             hash    model name -> description registered by workers
    <p>:calibration:<model> string float32 vectors of the calibration corpus (int8/uint8 ranges)
    <p>:calibrating:<model> string lock held by the worker recording them (with a TTL)
    <p>:idem:<key>         string  "<job id> <request digest>" once bound, or
                                   "<job id>:<lease until, ms>" while its upload runs
    <p>:janitor:jobs       zset    job id -> creation time, of jobs not yet announced
                                   finished: what the job janitor walks
    <p>:stats:texts        string  texts embedded, all time (for texts/s)
    <p>:metrics            hash    worker-side counters and histograms for /metrics
    <p>:{<tag>}:sync       string  written by a replica barrier before its WAIT (expires)
    <p>:{r:<id>}:reply     list    a worker's reply to an older server's request (expires)
    <p>:inbox:<server>     stream  workers' replies to one server process's requests
                                   (capped, expires)
    <p>:inflight:<owner>   zset    one owner's interactive request ids by deadline (ms)
    <p>:cache:<fp>:<hash>  string  raw model output for one text (fp: model, revision, backend)
    <p>:cache:index        zset    cache entry key -> time stored (the size cap evicts oldest)
    <p>:jobs               zset    every job id by creation time (admin job list)
    <p>:jobs:<owner>       zset    one owner's job ids by creation time (job list)
    <p>:session:<digest>   string  a dashboard session (owner, CSRF token), with a TTL
    <p>:sessions:<owner>   zset    one owner's live session keys by expiry (ms): the quota,
                                   and what makes a session valid (expires with the last)
    <p>:active:<owner>     zset    job id -> time listed, of one API key's unfinished jobs
                                   (its per-key quotas; expires when the key goes idle)
    <p>:{<file>}:file      hash    an uploaded file's description (owner, name, size, parts)
    <p>:{<file>}:parts     hash    part number -> up to 1 MiB of the file's bytes
    <p>:files:<owner>      hash    file id -> "<created ms> <bytes>": one key's files, its quota
    <p>:{<batch>}:batch    hash    an OpenAI-style batch: its input file, job, state, errors
    <p>:{<batch>}:requests hash    part number -> packed (custom_id, first input, inputs) rows
    <p>:batches:<owner>    zset    one key's batch ids by creation time (batch list)

Cache entries carry no hash tag on purpose: they spread over every slot of a
cluster, and are only ever read and written one key a command.

The job lists live in other hash slots than the jobs they name, so they are
written before the job becomes visible and read with the jobs filtered for
existence (ids whose job expired are pruned as they are met).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from redis.crc import key_slot

GROUP = "workers"
LANES = ("fast", "bulk")
SLOTS = 16384

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def partition_tag(slug: str, partition: int, partitions: int) -> str:
    """The hash tag of bulk partition `partition` (> 0) of `partitions`.

    Partition 0 keeps the model's own tag `q:<slug>`. Split the 16384 slots
    into `partitions` equal ranges, as a cluster of that many primaries is
    usually laid out: partition k gets a tag whose slot falls k ranges after
    partition 0's, the first of `q:<slug>:<k>:<salt>` for salt 0, 1, ... that
    does, so every process names the same streams and each range has one.
    """
    def range_of(tag: str) -> int:
        return key_slot(tag.encode()) * partitions // SLOTS

    target = (range_of(f"q:{slug}") + partition) % partitions
    salt = 0
    while range_of(f"q:{slug}:{partition}:{salt}") != target:
        salt += 1
    return f"q:{slug}:{partition}:{salt}"


@dataclass(frozen=True)
class QueueLayout:
    """One model's queue: a fast lane, and its bulk lane split into partitions on
    different hash slots, so a cluster's primaries share a large job's queue traffic.

    The fast lane and bulk partition 0 share a slot (one blocking XREADGROUP
    waits on both); a job's chunk c goes to partition c mod n, so every bulk
    job puts its first chunk where idle workers wait.
    """

    fast: str
    bulks: tuple[str, ...]

    @property
    def streams(self) -> tuple[str, ...]:
        """Every stream: the fast lane, then the bulk partitions."""
        return (self.fast, *self.bulks)

    @property
    def slot_groups(self) -> tuple[tuple[str, ...], ...]:
        """The streams grouped by hash slot (what one script may touch at once)."""
        return ((self.fast, self.bulks[0]), *((bulk,) for bulk in self.bulks[1:]))

    def bulk_of(self, chunk: int) -> str:
        """The bulk partition chunk `chunk` of a job is queued on."""
        return self.bulks[chunk % len(self.bulks)]


def model_slug(model: str) -> str:
    """A short, key-safe name for a model (a name or a filesystem path)."""
    cleaned = _SAFE.sub("_", model)[-48:]
    digest = hashlib.sha1(model.encode()).hexdigest()[:8]
    return f"{cleaned}-{digest}"


@dataclass(frozen=True)
class Keys:
    """Builds key names under one prefix."""

    prefix: str = "es"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:{{{job_id}}}:job"

    def inputs(self, job_id: str) -> str:
        return f"{self.prefix}:{{{job_id}}}:inputs"

    def vectors(self, job_id: str) -> str:
        return f"{self.prefix}:{{{job_id}}}:vectors"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}:{{{job_id}}}:events"

    def job_keys(self, job_id: str) -> tuple[str, str, str, str]:
        return (
            self.job(job_id),
            self.inputs(job_id),
            self.vectors(job_id),
            self.events(job_id),
        )

    def attempt(self, job_id: str, chunk: int) -> str:
        return f"{self.prefix}:{{{job_id}}}:attempt:{chunk}"

    def sync(self, tag: str) -> str:
        """A key of hash tag `tag`'s slot that a barrier writes before it WAITs."""
        return f"{self.prefix}:{{{tag}}}:sync"

    def queue(self, model: str, lane: str) -> str:
        return f"{self.prefix}:{{q:{model_slug(model)}}}:{lane}"

    def queues(self, model: str) -> tuple[str, ...]:
        return tuple(self.queue(model, lane) for lane in LANES)

    def layout(self, model: str, partitions: int = 1) -> QueueLayout:
        """The model's queue split into `partitions` bulk streams (see `QueueLayout`)."""
        return QueueLayout(self.queue(model, "fast"),
                           tuple(self._bulk(model, k, partitions) for k in range(partitions)))

    def _bulk(self, model: str, partition: int, partitions: int) -> str:
        if partition == 0:
            return self.queue(model, "bulk")
        return f"{self.prefix}:{{{partition_tag(model_slug(model), partition, partitions)}}}:bulk"

    @property
    def feed(self) -> str:
        return f"{self.prefix}:feed"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def heartbeat(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    @property
    def models(self) -> str:
        return f"{self.prefix}:models"

    def calibration(self, model: str) -> str:
        return f"{self.prefix}:calibration:{model_slug(model)}"

    def calibration_lock(self, model: str) -> str:
        return f"{self.prefix}:calibrating:{model_slug(model)}"

    def idempotency(self, scope: str, key: str) -> str:
        digest = hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()[:32]
        return f"{self.prefix}:idem:{digest}"

    @property
    def active_jobs(self) -> str:
        return f"{self.prefix}:janitor:jobs"

    @property
    def texts_counter(self) -> str:
        return f"{self.prefix}:stats:texts"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}:metrics"

    def cache_entry(self, fingerprint: str, text_hash: str) -> str:
        return f"{self.prefix}:cache:{fingerprint}:{text_hash}"

    @property
    def cache_index(self) -> str:
        return f"{self.prefix}:cache:index"

    def reply(self, request_id: str) -> str:
        return f"{self.prefix}:{{r:{request_id}}}:reply"

    def inbox(self, server_id: str) -> str:
        return f"{self.prefix}:inbox:{server_id}"

    def requests_in_flight(self, owner: str) -> str:
        return f"{self.prefix}:inflight:{owner}"

    def job_index(self, owner: str | None) -> str:
        """The job list of one owner, or of every job when `owner` is None."""
        if owner is None:
            return f"{self.prefix}:jobs"
        return f"{self.prefix}:jobs:{owner or '-'}"

    def owner_jobs(self, owner: str) -> str:
        """The unfinished jobs of one owner (an API key's digest), for its quotas."""
        return f"{self.prefix}:active:{owner or '-'}"

    def session(self, session_id: str) -> str:
        digest = hashlib.sha256(session_id.encode()).hexdigest()[:32]
        return f"{self.prefix}:session:{digest}"

    def sessions(self, owner: str) -> str:
        """The index of one owner's dashboard sessions."""
        return f"{self.prefix}:sessions:{owner or '-'}"

    def file(self, file_id: str) -> str:
        return f"{self.prefix}:{{{file_id}}}:file"

    def file_parts(self, file_id: str) -> str:
        return f"{self.prefix}:{{{file_id}}}:parts"

    def files(self, owner: str) -> str:
        """One owner's uploaded files: the file list and its quota."""
        return f"{self.prefix}:files:{owner or '-'}"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:{{{batch_id}}}:batch"

    def batch_requests(self, batch_id: str) -> str:
        return f"{self.prefix}:{{{batch_id}}}:requests"

    def batches(self, owner: str) -> str:
        """One owner's batch ids by creation time."""
        return f"{self.prefix}:batches:{owner or '-'}"
