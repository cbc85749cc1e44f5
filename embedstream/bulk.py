"""`embedstream submit` and `embedstream results`: bulk jobs from files, resumable.

The upload is streamed as NDJSON (the file is read twice, once to derive the
Idempotency-Key and once to send it, and never held whole). The key is a
digest of the file's bytes and of the options, so a run killed during the
upload and started again with the same arguments gets the same job back from
the server instead of a second one. Once the job is known its id is kept in
the state file beside `--out` (see `embedstream.spool`), and a later run
follows the job from the state's cursor: one job, no duplicate row. One run
at a time writes an output: a second run on the same `--out` is refused while
the first holds its lock (`embedstream.spool.OutputLock`).

`results` without `--out` writes JSONL to stdout instead (the `.jsonl` output's
lines, in the order results arrive, each with its `index`); it is not
resumable. Progress and messages go to stderr only.

Exit codes say what happened:

    0  every input embedded (or, with --no-wait, the job was queued)
    1  an unexpected error (a bug: the traceback is printed)
    2  bad input: unreadable file, bad option, or the server refused the job (4xx)
    3  the job ended with failed inputs (or failed as a whole)
    4  the job was cancelled
    5  the server was unreachable (after retrying for --retry-for seconds)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from embedstream.client import Client, Job
from embedstream.outputs import jsonl_line
from embedstream.protocol import (
    TERMINAL,
    Backoff,
    EmbedstreamError,
    JobStatus,
    Progress,
    Result,
    ServerUnreachable,
    retryable,
)
from embedstream.sources import Source, SourceError
from embedstream.spool import OutputBusy, OutputLock, Spool, State, output_kind

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_FAILED_INPUTS, EXIT_CANCELLED, EXIT_UNREACHABLE = range(6)
HASH_PIECE_BYTES = 1024 * 1024


class SubmitOptions(TypedDict, total=False):
    """The job options `submit` passes on (None: the server's default)."""

    dimensions: int | None
    model: str | None
    truncate: bool
    normalize: bool
    chunk: bool | None
    chunk_overlap: int | None
    chunk_output: str | None
    chunking: str | None
    chunk_tokens: int | None
    chunk_boundary: str | None
    prompt: str | None
    prompt_name: str | None


@dataclass(frozen=True)
class Run:
    """One `submit` or `results` invocation."""

    client: Client
    out: Path | None
    quiet: bool = False


def derive_key(source: Source, options: SubmitOptions) -> str | None:
    """An Idempotency-Key from the file's bytes and the options (None for stdin)."""
    if source.is_stdin:
        return None
    digest = hashlib.sha256()
    digest.update(json.dumps({"options": options, "format": source.format,
                              "column": source.column, "id_column": source.id_column},
                             sort_keys=True).encode())
    with open(source.path, "rb") as handle:
        while piece := handle.read(HASH_PIECE_BYTES):
            digest.update(piece)
    return f"embedstream-submit-{digest.hexdigest()[:40]}"


@contextlib.contextmanager
def _spool(run: Run) -> Iterator[Spool | None]:
    """The spool of `run.out`, under the output's lock for the whole run (None: no --out)."""
    if run.out is None:
        yield None
        return
    output_kind(run.out)  # a bad name is refused before anything is locked or sent
    with OutputLock(run.out):
        yield Spool(run.out)


def submit(run: Run, source: Source, options: SubmitOptions, *, wait: bool,
           idempotency_key: str | None = None) -> int:
    """Upload `source` as one job (or resume it), then follow it into `run.out`."""
    with _spool(run) as spool:
        return _submit(run, spool, source, options, wait, idempotency_key)


def _submit(run: Run, spool: Spool | None, source: Source, options: SubmitOptions,
            wait: bool, idempotency_key: str | None) -> int:
    key = idempotency_key or derive_key(source, options)
    state = (spool.load(key) if spool and key else None) or State(key or "")
    if state.job_id is None:
        job = _upload(run.client, source, options, key)
        state.job_id = job.id
        if spool is not None:
            spool.save(state)
        _say(run, f"job {job.id} queued ({job.total} texts)")
    else:
        job = run.client.job(state.job_id)
        _say(run, f"resuming job {job.id} from the state in {spool.state_path if spool else ''}")
    if not wait:
        print(job.id)
        return EXIT_OK
    return follow(run, job, spool, state)


def results(run: Run, job_id: str) -> int:
    """Fetch an existing job's results into `run.out` (resumable), else as JSONL on stdout."""
    with _spool(run) as spool:
        key = f"job:{job_id}"
        state = (spool.load(key) if spool else None) or State(key, job_id=job_id)
        return follow(run, run.client.job(job_id), spool, state, echo=spool is None)


def _upload(client: Client, source: Source, options: SubmitOptions, key: str | None) -> Job:
    """POST the inputs; with a key, retry through dropped connections and 409/5xx."""
    backoff = Backoff(client.reconnect_for_s)
    delays = backoff.delays()
    while True:
        try:
            return client.submit(source.inputs(), idempotency_key=key, **options)
        except (EmbedstreamError, OSError) as exc:
            cause = exc.__cause__ if isinstance(exc, ServerUnreachable) else exc
            if key is None or cause is None or not (retryable(cause) or
                                                    isinstance(exc, ServerUnreachable)):
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            time.sleep(delay)


def follow(run: Run, job: Job, spool: Spool | None, state: State, *,
           echo: bool = False) -> int:
    """Follow the job's stream to its end, spooling results (or, with `echo`, writing
    them to stdout as JSONL); write the output."""
    status = job.status()
    total = int(status["total"])
    state.total, state.dims = total, state.dims or int(status["dimensions"])
    if spool is not None:
        spool.open(state)
    # A finished job's bar counts the results fetched; a running one's, the texts made.
    fetching = status["status"] in TERMINAL
    bar = _progress(run, total, state.rows if fetching else _made(status))
    final = status
    try:
        for update in job.stream(after=state.cursor):
            if update.results and spool is not None:
                spool.append(state, update.results, update.cursor)
            elif update.results and echo:
                _echo(update.results)
                state.rows += len(update.results)
            if fetching:
                _advance(bar, state.rows)
            elif update.progress is not None:
                _advance(bar, _made(update.progress))
            if update.end is not None:
                final = update.end
                _advance(bar, state.rows if fetching else _made(final))
    finally:
        if bar is not None:
            bar.close()
        if spool is not None:
            spool.close()
    missing = spool.finish(state, total) if spool is not None else 0
    return _report(run, final, missing)


def _echo(results: list[Result]) -> None:
    out = sys.stdout.buffer
    out.write(b"".join(jsonl_line(r) for r in results))
    out.flush()


def _made(progress: JobStatus | Progress) -> int:
    return int(progress.get("done") or 0) + int(progress.get("failed") or 0)


def _report(run: Run, final: JobStatus, missing: int) -> int:
    status, failed = final.get("status"), int(final.get("failed") or 0)
    written = f"; wrote {run.out}" if run.out else ""
    _say(run, f"job {final.get('id')} {status}: {final.get('done')} done, {failed} failed"
              f"{written}")
    if status == "cancelled":
        _say(run, f"{missing} inputs were never embedded (NaN rows / absent lines)")
        return EXIT_CANCELLED
    if status == "failed" or failed:
        _say(run, "failed inputs have NaN rows (.npy) or an 'error' (.jsonl)")
        return EXIT_FAILED_INPUTS
    return EXIT_OK


def _progress(run: Run, total: int, initial: int) -> Any:
    if run.quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="texts", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def _advance(bar: Any, made: int) -> None:
    if bar is None:
        return
    if made > bar.n:
        bar.update(made - bar.n)


def _say(run: Run, message: str) -> None:
    if not run.quiet:
        print(message, file=sys.stderr)


def exit_code_of(exc: BaseException) -> tuple[int, str]:
    """The exit code and message for an error that ended a run."""
    if isinstance(exc, ServerUnreachable):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, OutputBusy):
        return EXIT_BAD_INPUT, str(exc)
    if isinstance(exc, SourceError | ValueError | UnicodeDecodeError | OSError):
        return EXIT_BAD_INPUT, str(exc)
    if isinstance(exc, EmbedstreamError):
        code = EXIT_BAD_INPUT if 400 <= exc.status < 500 else EXIT_UNREACHABLE
        return code, str(exc)
    return EXIT_BUG, repr(exc)


