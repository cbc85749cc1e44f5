"""The `embedstream` command: up, serve, worker, mcp, submit.

Every flag overrides the `EMBEDSTREAM_*` variable of the same name; with
neither, the Settings default holds. Logging is configured here and only
here, always to stderr (stdout belongs to `mcp`'s protocol and `submit`'s
output).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import ipaddress
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from embedstream.logs import configure as configure_logs
from pipeline import PREFIX, Settings

app = typer.Typer(help="A streaming embedding pipeline on Redis Streams.",
                  no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
logger = logging.getLogger("embedstream")

def _env(name: str, text: str) -> str:
    """Help text ending in the option's variable and default (escaped: rich would eat `[`)."""
    default = _DEFAULTS[name]
    shown = "unset" if default in (None, ()) else default
    return f"{text} \\[env: {PREFIX}{name.upper()}; default: {shown}]"


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings)}

RedisUrl = Annotated[str | None, typer.Option(
    help=_env("redis_url", "Redis/Valkey URL; unset: the embedded server"), show_default=False)]
DataDir = Annotated[Path | None, typer.Option(
    help=_env("data_dir", "Where the embedded server keeps its data"), show_default=False)]
Model = Annotated[str | None, typer.Option(
    help=_env("model", "sentence-transformers model name or path"), show_default=False)]
Models = Annotated[list[str] | None, typer.Option(
    "--model", help=_env("model", "Model to serve (name or path); repeat it to serve several "
                         "models, each with its own workers; the first is the default"),
    show_default=False)]
Backend = Annotated[str | None, typer.Option(
    help=_env("backend", "How workers run the model: torch, or module:Factory"),
    show_default=False)]
Device = Annotated[str | None, typer.Option(
    help=_env("device", "auto, cpu, cuda, cuda:1…"), show_default=False)]
Host = Annotated[str | None, typer.Option(help=_env("host", "Bind address"),
                                          show_default=False)]
Port = Annotated[int | None, typer.Option(help=_env("port", "Port"), show_default=False)]
ApiKeys = Annotated[str | None, typer.Option(
    help=_env("api_keys", "Comma-separated API keys; unset: no auth"), show_default=False)]
Insecure = Annotated[bool, typer.Option(
    "--insecure", help=_env("insecure", "Allow a non-loopback bind without API keys"),
    show_default=False)]
LogLevel = Annotated[str, typer.Option(help="debug, info, warning, error")]
LogFormat = Annotated[str, typer.Option(help="text, or json (one object a line, for log "
                                             "shippers)")]


def _settings(**overrides: Any) -> Settings:
    return Settings.from_env(**overrides)


def _logging(level: str, fmt: str = "text") -> None:
    try:
        configure_logs(level, fmt)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
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
        "--version", callback=_version, is_eager=True,
        help="Print the version and exit")] = False) -> None:
    """A streaming embedding pipeline on Redis Streams."""


def _check_bind(settings: Settings) -> None:
    """Refuse to expose an unauthenticated server beyond loopback."""
    if settings.api_keys or settings.insecure:
        return
    host = settings.host
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        typer.echo(f"refusing to bind {host} without API keys: set EMBEDSTREAM_API_KEYS "
                   "or pass --insecure", err=True)
        raise typer.Exit(2)


def _api_keys(raw: str | None) -> tuple[str, ...] | None:
    return None if raw is None else tuple(k.strip() for k in raw.split(",") if k.strip())


@app.command()
def serve(redis_url: RedisUrl = None, data_dir: DataDir = None, model: Model = None,
          host: Host = None, port: Port = None, api_keys: ApiKeys = None,
          insecure: Insecure = False, log_level: LogLevel = "info",
          log_format: LogFormat = "text") -> None:
    """Run the ASGI server: REST, SSE, MCP, dashboard, health, metrics."""
    _logging(log_level, log_format)
    settings = _settings(redis_url=redis_url, data_dir=data_dir, model=model, host=host,
                         port=port, api_keys=_api_keys(api_keys), insecure=insecure or None)
    _check_bind(settings)
    from pipeline.store import redis_for

    with redis_for(settings) as url:
        asyncio.run(_serve(settings.replace(redis_url=url), log_level))


async def _serve(settings: Settings, log_level: str,
                 on_started: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
    import uvicorn

    from mcp_server.app import create_app

    # log_config=None: uvicorn's loggers propagate to ours (text or JSON).
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_level=log_level, log_config=None, lifespan="on",
                            timeout_graceful_shutdown=5)
    await _server_class(on_started)(config).serve()


def _server_class(on_started: Callable[[], Coroutine[Any, Any, None]] | None = None) -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, minus re-raising the stop signal after shutdown, plus a started hook.

        uvicorn re-raises SIGINT/SIGTERM once it has shut down; under SIGTERM
        that kills the process before `up` stops its workers and the embedded
        server. Here a signal only asks the server to exit, and the caller's
        cleanup runs. `on_started` runs once the port is bound, so `up` prints
        URLs that already answer.
        """

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit)
                        for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets: list[Any] | None = None) -> None:
            await super().startup(sockets)
            if self.started and on_started is not None:
                self.announcer: asyncio.Task[None] = asyncio.create_task(on_started())

    return Server


@app.command()
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
    from pipeline.store import redis_for

    with redis_for(settings) as url:
        asyncio.run(_work(settings.replace(redis_url=url), name))


async def _work(settings: Settings, name: str | None) -> None:
    from pipeline.model import load_embedder
    from workers.calibration import calibrate
    from workers.worker import Worker

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
        await Worker(settings, embedder, worker_id=name).run(stop)
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


@app.command()
def up(workers: Annotated[int, typer.Option(help="Worker processes per model")] = 1,
       redis_url: RedisUrl = None, data_dir: DataDir = None, model: Models = None,
       backend: Backend = None, device: Device = None, host: Host = None, port: Port = None,
       api_keys: ApiKeys = None, insecure: Insecure = False, log_level: LogLevel = "info",
       log_format: LogFormat = "text") -> None:
    """Everything on one machine: embedded Redis (unless a URL is set), workers, server."""
    _logging(log_level, log_format)
    settings = _settings(redis_url=redis_url, data_dir=data_dir,
                         model=model[0] if model else None, backend=backend,
                         device=device, host=host, port=port, api_keys=_api_keys(api_keys),
                         insecure=insecure or None)
    _check_bind(settings)
    models = list(dict.fromkeys(model or [settings.model]))
    from pipeline.store import redis_for

    with redis_for(settings, adopt=True) as url:
        settings = settings.replace(redis_url=url)
        total = workers * len(models)
        threads = str(max(1, (os.cpu_count() or 1) // max(1, total)))
        children = [_spawn_worker(settings.replace(model=name), log_level, log_format, threads)
                    for name in models for _ in range(workers)]
        try:
            asyncio.run(_serve(settings, log_level,
                               lambda: _announce(settings, total, models)))
        finally:
            _stop_children(children)


async def _announce(settings: Settings, workers: int, models: list[str]) -> None:
    """Print the URLs (the port is bound), then one `ready` line once a worker is up."""
    from pipeline import Keys
    from pipeline.store import connect, live_workers

    base = f"http://{settings.host}:{settings.port}"
    for line in (f"redis:     {settings.redis_url}", f"api:       {base}/v1/jobs",
                 f"dashboard: {base}/", f"metrics:   {base}/metrics",
                 f"mcp:       {base}/mcp (streamable HTTP), {base}/sse (legacy)",
                 f"workers:   {workers} starting (model {', '.join(models)})"):
        typer.echo(line, err=True)
    assert settings.redis_url
    redis = connect(settings.redis_url)
    try:
        while not (alive := await live_workers(redis, Keys(settings.key_prefix))):
            await asyncio.sleep(0.5)
        typer.echo(f"ready:     {len(alive)} worker(s) up; try "
                   f"curl -s {base}/v1/embeddings -H 'content-type: application/json' "
                   """-d '{"input": "hello"}'""", err=True)
    finally:
        await redis.aclose()


def _spawn_worker(settings: Settings, log_level: str, log_format: str,
                  threads: str) -> subprocess.Popen[bytes]:
    # Workers on one machine share its cores: without a thread cap each
    # would start one compute thread per core and they would oversubscribe.
    env = {"OMP_NUM_THREADS": threads, **os.environ,
           "EMBEDSTREAM_REDIS_URL": settings.redis_url or "",
           "EMBEDSTREAM_MODEL": settings.model, "EMBEDSTREAM_BACKEND": settings.backend,
           "EMBEDSTREAM_DEVICE": settings.device}
    return subprocess.Popen([sys.executable, "-m", "embedstream", "worker",
                             "--log-level", log_level, "--log-format", log_format], env=env,
                            start_new_session=True)


def _stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@app.command()
def mcp(redis_url: RedisUrl = None, data_dir: DataDir = None, model: Model = None,
        log_level: LogLevel = "warning", log_format: LogFormat = "text") -> None:
    """An MCP server over stdio, for desktop agents, on the same Redis as `up`."""
    _logging(log_level, log_format)
    settings = _settings(redis_url=redis_url, data_dir=data_dir, model=model)
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


Url = Annotated[str | None, typer.Option(
    help=_env("url", "Where the server is"), show_default=False)]
ApiKey = Annotated[str | None, typer.Option(
    help="API key \\[env: first of EMBEDSTREAM_API_KEYS]", show_default=False)]
Out = Annotated[Path | None, typer.Option(
    "--out", "-o", help="Write results to a .npy (float32 rows in input order, ids in "
    ".ids.txt beside it) or a .jsonl file; resumable (state kept beside it)",
    show_default=False)]
RetryFor = Annotated[float, typer.Option(
    help="Seconds to keep retrying an unreachable server before exit code 5")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or messages")]


@app.command()
def submit(
    file: Annotated[str, typer.Argument(help="A .txt, .jsonl, .csv or .tsv file; - for stdin "
                                             "(one text a line unless --format)")],
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
        help="Cut texts over the model's limit (else the job is refused)")] = True,
    normalize: Annotated[bool, typer.Option(help="L2-normalize the vectors")] = True,
    chunk: Annotated[bool | None, typer.Option(
        "--chunk/--no-chunk", help="Split texts over the model's limit into overlapping "
        "windows and pool them (default: the server's, off)", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(
        help="A literal prefix for every text", show_default=False)] = None,
    prompt_name: Annotated[str | None, typer.Option(
        help="A prompt from the model's configuration (e.g. query)", show_default=False)]
        = None,
    wait: Annotated[bool, typer.Option(
        help="Follow the job to its end; --no-wait prints its id and exits")] = True,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Default: derived from the file's bytes and the options (none for stdin)",
        show_default=False)] = None,
    url: Url = None, api_key: ApiKey = None, retry_for: RetryFor = 300.0, quiet: Quiet = False,
) -> None:
    """Submit a file of texts as one job, with a progress bar; resumable.

    Exit codes: 0 done, 2 bad input, 3 some inputs failed, 4 cancelled,
    5 server unreachable.
    """
    from embedstream import bulk
    from embedstream.sources import Source, detect_format

    options = {"dimensions": dimensions, "model": model, "truncate": truncate,
               "normalize": normalize, "chunk": chunk, "prompt": prompt,
               "prompt_name": prompt_name}

    def run(client: Any) -> int:
        source = Source(file, detect_format(file, input_format), column, id_column)
        return bulk.submit(bulk.Run(client, out, quiet), source, options, wait=wait,
                           idempotency_key=idempotency_key)

    raise typer.Exit(_client_command(url, api_key, retry_for, run))


@app.command()
def results(
    job_id: Annotated[str, typer.Argument(help="The job's id")],
    out: Out = None, url: Url = None, api_key: ApiKey = None, retry_for: RetryFor = 300.0,
    quiet: Quiet = False,
) -> None:
    """Fetch a job's results (following it if it still runs) into --out; resumable."""
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
