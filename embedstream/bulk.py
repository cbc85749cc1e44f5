"""`embedstream submit` and `embedstream results`: bulk jobs from files, resumable.

The upload is streamed as NDJSON (the file is read twice, once to derive the
Idempotency-Key and once to send it, and never held whole). The key is a
digest of the file's bytes and of the options, so a run killed during the
upload and started again with the same arguments gets the same job back from
the server instead of a second one. Once the job is known its id is kept in
the state file beside `--out` (see `embedstream.spool`), and a later run
follows the job from the state's cursor: one job, no duplicate row.

Exit codes say what happened:

    0  every input embedded (or, with --no-wait, the job was queued)
    1  an unexpected error (a bug: the traceback is printed)
    2  bad input: unreadable file, bad option, or the server refused the job (4xx)
    3  the job ended with failed inputs (or failed as a whole)
    4  the job was cancelled
    5  the server was unreachable (after retrying for --retry-for seconds)
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedstream.client import Client, Job
from embedstream.protocol import Backoff, EmbedstreamError, ServerUnreachable, retryable
from embedstream.sources import Source, SourceError
from embedstream.spool import Spool, State

EXIT_OK, EXIT_BUG, EXIT_BAD_INPUT, EXIT_FAILED_INPUTS, EXIT_CANCELLED, EXIT_UNREACHABLE = range(6)
HASH_PIECE_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Run:
    """One `submit` or `results` invocation."""

    client: Client
    out: Path | None
    quiet: bool = False


def derive_key(source: Source, options: dict[str, Any]) -> str | None:
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


def submit(run: Run, source: Source, options: dict[str, Any], *, wait: bool,
           idempotency_key: str | None = None) -> int:
    """Upload `source` as one job (or resume it), then follow it into `run.out`."""
    key = idempotency_key or derive_key(source, options)
    spool = Spool(run.out) if run.out else None
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
    """Fetch an existing job's results into `run.out`, resumable like `submit`."""
    spool = Spool(run.out) if run.out else None
    key = f"job:{job_id}"
    state = (spool.load(key) if spool else None) or State(key, job_id=job_id)
    return follow(run, run.client.job(job_id), spool, state)


def _upload(client: Client, source: Source, options: dict[str, Any], key: str | None) -> Job:
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


def follow(run: Run, job: Job, spool: Spool | None, state: State) -> int:
    """Follow the job's stream to its end, spooling results; write the output."""
    status = job.status()
    total = int(status["total"])
    state.total, state.dims = total, state.dims or int(status["dimensions"])
    if spool is not None:
        spool.open(state)
    bar = _progress(run, total, int(status["done"]) + int(status["failed"]))
    final: dict[str, Any] = status
    try:
        for update in job.stream(after=state.cursor):
            if update.results and spool is not None:
                spool.append(state, update.results, update.cursor)
            if update.progress is not None:
                _advance(bar, update.progress)
            if update.end is not None:
                final = update.end
                _advance(bar, final)
    finally:
        if bar is not None:
            bar.close()
        if spool is not None:
            spool.close()
    missing = spool.finish(state, total) if spool is not None else 0
    return _report(run, final, missing)


def _report(run: Run, final: dict[str, Any], missing: int) -> int:
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


def _advance(bar: Any, progress: dict[str, Any]) -> None:
    if bar is None:
        return
    made = int(progress.get("done") or 0) + int(progress.get("failed") or 0)
    if made > bar.n:
        bar.update(made - bar.n)


def _say(run: Run, message: str) -> None:
    if not run.quiet:
        print(message, file=sys.stderr)


def exit_code_of(exc: BaseException) -> tuple[int, str]:
    """The exit code and message for an error that ended a run."""
    if isinstance(exc, ServerUnreachable):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, SourceError | ValueError | UnicodeDecodeError | OSError):
        return EXIT_BAD_INPUT, str(exc)
    if isinstance(exc, EmbedstreamError):
        code = EXIT_BAD_INPUT if 400 <= exc.status < 500 else EXIT_UNREACHABLE
        return code, str(exc)
    return EXIT_BUG, repr(exc)


