"""The `embedstream` command: up, serve, worker, mcp, submit, results.

Every flag overrides the `EMBEDSTREAM_*` variable of the same name; with
neither, the Settings default holds (the options are in `embedstream.flags`).
Logging is configured here and only here, always to stderr (stdout belongs
to `mcp`'s protocol and to the output of `submit` and `results`).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import ipaddress
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from embedstream import processes
from embedstream.flags import (
    FLAG,
    ApiKey,
    ApiKeys,
    Backend,
    Command,
    DataDir,
    Device,
    Group,
    Host,
    Insecure,
    LogFormat,
    LogLevel,
    Model,
    Models,
    Out,
    Port,
    Quiet,
    RedisUrl,
    RetryFor,
    Url,
    api_keys_of,
)
from embedstream.logs import configure as configure_logs
from pipeline import PREFIX, PipelineError, Settings, tracing

app = typer.Typer(help="A streaming embedding pipeline on Redis Streams.", cls=Group,
                  no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
logger = logging.getLogger("embedstream")


def _settings(**overrides: Any) -> Settings:
    return Settings.from_env(**overrides)


def _logging(level: str, fmt: str = "text") -> None:
    try:
        configure_logs(level, fmt)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None


def _tracing(settings: Settings, service: str) -> None:
    """Set the process's traces up (`pipeline.tracing`); a setting that cannot work exits 2."""
    try:
        tracing.configure(settings, service)
    except PipelineError as exc:
        typer.echo(f"embedstream: {exc.message}", err=True)
        raise typer.Exit(2) from None


def _version(value: bool) -> None:
    if value:
        try:
            version = importlib.metadata.version("embedstream")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        typer.echo(f"embedstream {version}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, metavar=FLAG,
        help="Print the version and exit")] = False) -> None:
    """A streaming embedding pipeline on Redis Streams."""


def _check_bind(settings: Settings) -> None:
    """Refuse to expose an unauthenticated server beyond loopback (admin keys are keys too)."""
    if settings.api_keys or settings.admin_keys or settings.insecure:
        return
    host = settings.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        typer.echo(f"refusing to bind {host} without API keys: set EMBEDSTREAM_API_KEYS "
                   "(or EMBEDSTREAM_ADMIN_KEYS) or pass --insecure", err=True)
        raise typer.Exit(2)


@app.command(cls=Command)
def serve(redis_url: RedisUrl = None, data_dir: DataDir = None, model: Model = None,
          host: Host = None, port: Port = None, api_keys: ApiKeys = None,
          insecure: Insecure = False, log_level: LogLevel = "info",
          log_format: LogFormat = "text") -> None:
    """Run the ASGI server: REST, SSE, MCP, dashboard, health, metrics."""
    _logging(log_level, log_format)
    settings = _settings(redis_url=redis_url, data_dir=data_dir, model=model, host=host,
                         port=port, api_keys=api_keys_of(api_keys), insecure=insecure or None)
    _check_bind(settings)
    _tracing(settings, tracing.SERVER)
    processes.check_port(settings)
    from pipeline.store import redis_for

    with redis_for(settings) as url:
        asyncio.run(processes.serve(settings.replace(redis_url=url), log_level))


@app.command(cls=Command)
def worker(redis_url: RedisUrl = None, data_dir: DataDir = None, model: Model = None,
           backend: Backend = None, device: Device = None,
           name: Annotated[str | None, typer.Option(
               help="Stable consumer name, so a restarted worker resumes its own pending "
                    "work at once")] = None,
           log_level: LogLevel = "info", log_format: LogFormat = "text") -> None:
    """Run one worker: claim chunks, embed them, commit results."""
    _logging(log_level, log_format)
    settings = _settings(redis_url=redis_url, data_dir=data_dir, model=model,
                         backend=backend, device=device)
    _tracing(settings, tracing.WORKER)
    from pipeline.store import redis_for

    with redis_for(settings) as url:
        asyncio.run(_work(settings.replace(redis_url=url), name))


async def _work(settings: Settings, name: str | None) -> None:
    from pipeline.model import load_embedder
    from workers.calibration import calibrate
    from workers.worker import run_worker

    embedder = await asyncio.to_thread(load_embedder, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stopper(stop))
    # Beside the loop, not before it: the worker registers and serves at once,
    # and only the first worker of a model (a lock decides) embeds the corpus.
    calibration = asyncio.create_task(calibrate(settings, embedder)) if settings.calibrate \
        else None
    try:
        await run_worker(settings, embedder, stop, worker_id=name)
    finally:
        if calibration is not None:
            calibration.cancel()
            await asyncio.gather(calibration, return_exceptions=True)


def _stopper(stop: asyncio.Event) -> Any:
    """SIGINT/SIGTERM: drain (finish the batch in hand, commit, ack, deregister); twice: exit."""
    def handle() -> None:
        if stop.is_set():
            # Leave now, without a word to Redis: the entries in hand stay
            # pending and peers reclaim them after the visibility timeout.
            logger.warning("second stop signal: exiting at once")
            os._exit(130)
        logger.info("draining: finishing the batch in hand (signal again to exit at once)")
        stop.set()
    return handle


@app.command(cls=Command)
def up(workers: Annotated[int, typer.Option(help="Worker processes per model")] = 1,
       redis_url: RedisUrl = None, data_dir: DataDir = None, model: Models = None,
       backend: Backend = None, device: Device = None, host: Host = None, port: Port = None,
       api_keys: ApiKeys = None, insecure: Insecure = False, log_level: LogLevel = "info",
       log_format: LogFormat = "text") -> None:
    """Everything on one machine: embedded Redis (unless a URL is set), workers, server."""
    _logging(log_level, log_format)
    settings = _settings(redis_url=redis_url, data_dir=data_dir,
                         model=model[0] if model else None, backend=backend,
                         device=device, host=host, port=port, api_keys=api_keys_of(api_keys),
                         insecure=insecure or None)
    _check_bind(settings)
    _tracing(settings, tracing.SERVER)
    processes.check_port(settings)
    models = list(dict.fromkeys(model or [settings.model]))
    from pipeline.store import redis_for

    with redis_for(settings, adopt=True) as url:
        settings = settings.replace(redis_url=url)
        total = workers * len(models)
        threads = str(max(1, (os.cpu_count() or 1) // max(1, total)))
        children = [processes.spawn_worker(settings.replace(model=name), log_level,
                                           log_format, threads)
                    for name in models for _ in range(workers)]
        try:
            asyncio.run(processes.serve(settings, log_level,
                                        lambda: processes.announce(settings, total, models)))
        finally:
            processes.stop_children(children)


def agent_data_dir() -> Path:
    """The per-user data dir of `mcp`: $XDG_DATA_HOME/embedstream, else ~/.local/share/…"""
    xdg = os.environ.get("XDG_DATA_HOME", "")
    base = Path(xdg) if Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "embedstream"


def _mcp_settings(settings: Settings, data_dir_given: bool) -> Settings:
    """Where `mcp` looks when nothing names a data dir: not the agent's working folder."""
    from pipeline.store import find_running

    if settings.redis_url or data_dir_given or f"{PREFIX}DATA_DIR" in os.environ:
        return settings
    if find_running(settings.data_dir) is not None:  # an `up` runs in this very folder
        return settings
    return settings.replace(data_dir=agent_data_dir())


McpDataDir = Annotated[Path | None, typer.Option(
    help="Where the embedded server keeps its data \\[env: EMBEDSTREAM_DATA_DIR; default: "
    "./.embedstream if a running `up` uses it, else $XDG_DATA_HOME/embedstream, or "
    "~/.local/share/embedstream]", show_default=False)]


@app.command(cls=Command)
def mcp(redis_url: RedisUrl = None, data_dir: McpDataDir = None, model: Model = None,
        log_level: LogLevel = "warning", log_format: LogFormat = "text") -> None:
    """An MCP server over stdio, for desktop agents, on the same Redis as `up`.

    Agents start it from any folder, so with no EMBEDSTREAM_REDIS_URL and no
    EMBEDSTREAM_DATA_DIR it uses the `up` running in ./.embedstream if there
    is one, else a per-user data dir (never a new .embedstream in the working
    folder). To reach an `up`, give the agent EMBEDSTREAM_DATA_DIR set to that
    `up`'s data dir (its folder's .embedstream), or EMBEDSTREAM_REDIS_URL.
    """
    _logging(log_level, log_format)
    settings = _mcp_settings(_settings(redis_url=redis_url, data_dir=data_dir, model=model),
                             data_dir is not None)
    _tracing(settings, tracing.SERVER)
    from mcp_server.agents import run_stdio
    from pipeline.store import find_running, redis_for

    # stdout is the protocol's: tell the agent's user on stderr, which
    # desktop agents show in their MCP server logs.
    where = f"the data dir {settings.data_dir.resolve()} (EMBEDSTREAM_DATA_DIR)"
    if settings.redis_url:
        where = "EMBEDSTREAM_REDIS_URL"
    elif find_running(settings.data_dir) is None:
        typer.echo(
            f"embedstream mcp: no running `embedstream up` uses {where}, and "
            "EMBEDSTREAM_REDIS_URL is unset: starting an embedded Redis there, which no "
            "worker serves. Start `embedstream up` with that data dir, or set "
            "EMBEDSTREAM_DATA_DIR or EMBEDSTREAM_REDIS_URL in the agent's config to the ones "
            "`up` uses.", err=True)
    with redis_for(settings) as url:
        typer.echo(f"embedstream mcp: using Redis {url} (from {where})", err=True)
        asyncio.run(run_stdio(settings.replace(redis_url=url)))


@app.command(cls=Command)
def submit(
    file: Annotated[str, typer.Argument(help="A .txt, .jsonl, .csv or .tsv file; - for stdin "
                                             "(one text a line unless --format; blank lines "
                                             "are skipped)")],
    out: Out = None,
    input_format: Annotated[str | None, typer.Option(
        "--format", help="txt, jsonl, csv or tsv; default: from the file's extension",
        show_default=False)] = None,
    column: Annotated[str | None, typer.Option(
        help="CSV/TSV column (or JSONL field) holding the text; default: text",
        show_default=False)] = None,
    id_column: Annotated[str | None, typer.Option(
        help="CSV/TSV column (or JSONL field) holding the input's id", show_default=False)]
        = None,
    dimensions: Annotated[int | None, typer.Option(
        help="Matryoshka truncation to the first N dimensions", show_default=False)] = None,
    model: Annotated[str | None, typer.Option(
        help="A model some worker serves; default: the server's", show_default=False)] = None,
    truncate: Annotated[bool, typer.Option(
        metavar=FLAG, help="Cut texts over the model's limit (else the job is refused)")]
        = True,
    normalize: Annotated[bool, typer.Option(metavar=FLAG, help="L2-normalize the vectors")]
        = True,
    chunk: Annotated[bool | None, typer.Option(
        "--chunk/--no-chunk", metavar=FLAG, help="Split texts over the model's limit into "
        "overlapping windows and pool them (default: the server's, off)", show_default=False)]
        = None,
    chunk_overlap: Annotated[int | None, typer.Option(
        help="With --chunk: tokens consecutive windows (or chunks) share; default: 32",
        show_default=False)] = None,
    chunk_output: Annotated[str | None, typer.Option(
        help="With --chunk: pooled (one vector an input) or chunks (also each chunk's "
        "offsets and vector: a .jsonl line's 'chunks'; beside a .npy, NAME.chunks.npy, a "
        "row a chunk, and NAME.chunks.jsonl, a line a row: index, id, start, end, tokens)",
        show_default=False)] = None,
    chunking: Annotated[str | None, typer.Option(
        help="With --chunk-output chunks: separate (each chunk alone) or late (chunks pooled "
        "from their window's token embeddings)", show_default=False)] = None,
    chunk_tokens: Annotated[int | None, typer.Option(
        help="Tokens a chunk holds at most; default: the model's window", show_default=False)]
        = None,
    chunk_boundary: Annotated[str | None, typer.Option(
        help="tokens (default) or sentence", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(
        help="A literal prefix for every text", show_default=False)] = None,
    prompt_name: Annotated[str | None, typer.Option(
        help="A prompt from the model's configuration (e.g. query)", show_default=False)]
        = None,
    wait: Annotated[bool, typer.Option(
        metavar=FLAG, help="Follow the job to its end; --no-wait prints its id and exits")]
        = True,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Default: derived from the file's bytes and the options (none for stdin)",
        show_default=False)] = None,
    url: Url = None, api_key: ApiKey = None, retry_for: RetryFor = 300.0, quiet: Quiet = False,
) -> None:
    """Submit a file of texts as one job, with a progress bar; resumable.

    Exit codes: 0 done, 2 bad input (or another run holds --out), 3 some
    inputs failed, 4 cancelled, 5 server unreachable.
    """
    from embedstream import bulk
    from embedstream.sources import Source, detect_format

    options = bulk.SubmitOptions(dimensions=dimensions, model=model, truncate=truncate,
                                 normalize=normalize, chunk=chunk, chunk_overlap=chunk_overlap,
                                 chunk_output=chunk_output, chunking=chunking,
                                 chunk_tokens=chunk_tokens, chunk_boundary=chunk_boundary,
                                 prompt=prompt,
                                 prompt_name=prompt_name)

    def run(client: Any) -> int:
        source = Source(file, detect_format(file, input_format), column, id_column)
        return bulk.submit(bulk.Run(client, out, quiet), source, options, wait=wait,
                           idempotency_key=idempotency_key)

    raise typer.Exit(_client_command(url, api_key, retry_for, run))


@app.command(cls=Command)
def results(
    job_id: Annotated[str, typer.Argument(help="The job's id")],
    out: Out = None, url: Url = None, api_key: ApiKey = None, retry_for: RetryFor = 300.0,
    quiet: Quiet = False,
) -> None:
    """Fetch a job's results into --out (resumable), or as JSONL on stdout.

    The job is followed if it still runs. Without --out each result is one
    line on stdout as it arrives, with its index; progress goes to stderr.
    Exit codes as for `submit`.
    """
    from embedstream import bulk

    raise typer.Exit(_client_command(
        url, api_key, retry_for, lambda client: bulk.results(bulk.Run(client, out, quiet),
                                                             job_id)))


def _client_command(url: str | None, api_key: str | None, retry_for: float,
                    run: Callable[[Any], int]) -> int:
    from embedstream import bulk
    from embedstream.client import Client

    try:
        with Client(url, api_key, reconnect_for_s=retry_for) as client:
            return run(client)
    except KeyboardInterrupt:
        typer.echo("interrupted; run the same command again to resume", err=True)
        return 130
    except Exception as exc:
        code, message = bulk.exit_code_of(exc)
        if code == bulk.EXIT_BUG:
            raise
        typer.echo(f"embedstream: {message}", err=True)
        return code
