"""The `embedstream` command: up, serve, worker, mcp, submit.

Every flag overrides the `EMBEDSTREAM_*` variable of the same name; with
neither, the Settings default holds. Logging is configured here and only
here, always to stderr (stdout belongs to `mcp`'s protocol and `submit`'s
output).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.settings import Settings

app = typer.Typer(help="A streaming embedding pipeline on Redis Streams.",
                  no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
logger = logging.getLogger("embedstream")

RedisUrl = Annotated[str | None, typer.Option(
    help="Redis/Valkey URL [env EMBEDSTREAM_REDIS_URL]; unset: the embedded server")]
DataDir = Annotated[Path | None, typer.Option(
    help="Where the embedded server keeps its data [env EMBEDSTREAM_DATA_DIR]")]
Model = Annotated[str | None, typer.Option(
    help="sentence-transformers model name or path [env EMBEDSTREAM_MODEL]")]
Backend = Annotated[str | None, typer.Option(
    help="torch, or module:Factory [env EMBEDSTREAM_BACKEND]")]
Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda… [env EMBEDSTREAM_DEVICE]")]
Host = Annotated[str | None, typer.Option(help="Bind address [env EMBEDSTREAM_HOST]")]
Port = Annotated[int | None, typer.Option(help="Port [env EMBEDSTREAM_PORT]")]
Insecure = Annotated[bool, typer.Option(
    "--insecure", help="Allow a non-loopback bind without API keys")]
LogLevel = Annotated[str, typer.Option(help="debug, info, warning, error")]


def _settings(**overrides: Any) -> Settings:
    return Settings.from_env(**overrides)


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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


@app.command()
def serve(redis_url: RedisUrl = None, data_dir: DataDir = None, model: Model = None,
          host: Host = None, port: Port = None, insecure: Insecure = False,
          log_level: LogLevel = "info") -> None:
    """Run the ASGI server: REST, SSE, MCP, dashboard, health, metrics."""
    _logging(log_level)
    settings = _settings(redis_url=redis_url, data_dir=data_dir, model=model, host=host,
                         port=port, insecure=insecure or None)
    _check_bind(settings)
    from pipeline.embedded import redis_for

    with redis_for(settings) as url:
        asyncio.run(_serve(settings.replace(redis_url=url), log_level))


async def _serve(settings: Settings, log_level: str) -> None:
    import uvicorn

    from mcp_server.app import create_app

    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port,
                            log_level=log_level, lifespan="on", timeout_graceful_shutdown=5)
    await _server_class()(config).serve()


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, minus re-raising the stop signal after shutdown.

        uvicorn re-raises SIGINT/SIGTERM once it has shut down; under SIGTERM
        that kills the process before `up` stops its workers and the embedded
        server. Here a signal only asks the server to exit, and the caller's
        cleanup runs.
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

    return Server


@app.command()
def worker(redis_url: RedisUrl = None, data_dir: DataDir = None, model: Model = None,
           backend: Backend = None, device: Device = None,
           name: Annotated[str | None, typer.Option(
               help="Stable consumer name, so a restarted worker resumes its own pending "
                    "work at once")] = None,
           log_level: LogLevel = "info") -> None:
    """Run one worker: claim chunks, embed them, commit results."""
    _logging(log_level)
    settings = _settings(redis_url=redis_url, data_dir=data_dir, model=model,
                         backend=backend, device=device)
    from pipeline.embedded import redis_for

    with redis_for(settings) as url:
        asyncio.run(_work(settings.replace(redis_url=url), name))


async def _work(settings: Settings, name: str | None) -> None:
    from pipeline.embedder import load_embedder
    from workers.worker import Worker

    embedder = await asyncio.to_thread(load_embedder, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _stopper(stop))
    await Worker(settings, embedder, worker_id=name).run(stop)


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
def up(workers: Annotated[int, typer.Option(help="Worker processes to start")] = 1,
       redis_url: RedisUrl = None, data_dir: DataDir = None, model: Model = None,
       backend: Backend = None, device: Device = None, host: Host = None, port: Port = None,
       insecure: Insecure = False, log_level: LogLevel = "info") -> None:
    """Everything on one machine: embedded Redis (unless a URL is set), workers, server."""
    _logging(log_level)
    settings = _settings(redis_url=redis_url, data_dir=data_dir, model=model, backend=backend,
                         device=device, host=host, port=port, insecure=insecure or None)
    _check_bind(settings)
    from pipeline.embedded import redis_for

    with redis_for(settings) as url:
        settings = settings.replace(redis_url=url)
        threads = str(max(1, (os.cpu_count() or 1) // max(1, workers)))
        children = [_spawn_worker(settings, log_level, threads) for _ in range(workers)]
        try:
            base = f"http://{settings.host}:{settings.port}"
            typer.echo(f"redis:     {url}", err=True)
            typer.echo(f"api:       {base}/v1/jobs", err=True)
            typer.echo(f"dashboard: {base}/", err=True)
            typer.echo(f"mcp:       {base}/mcp (streamable HTTP), {base}/sse (legacy)", err=True)
            typer.echo(f"workers:   {workers} starting (model {settings.model})", err=True)
            asyncio.run(_serve(settings, log_level))
        finally:
            _stop_children(children)


def _spawn_worker(settings: Settings, log_level: str, threads: str) -> subprocess.Popen[bytes]:
    # Workers on one machine share its cores: without a thread cap each
    # would start one compute thread per core and they would oversubscribe.
    env = {"OMP_NUM_THREADS": threads, **os.environ,
           "EMBEDSTREAM_REDIS_URL": settings.redis_url or "",
           "EMBEDSTREAM_MODEL": settings.model, "EMBEDSTREAM_BACKEND": settings.backend,
           "EMBEDSTREAM_DEVICE": settings.device}
    return subprocess.Popen([sys.executable, "-m", "embedstream", "worker",
                             "--log-level", log_level], env=env,
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
        log_level: LogLevel = "warning") -> None:
    """An MCP server over stdio, for desktop agents, on the same Redis as `up`."""
    _logging(log_level)
    settings = _settings(redis_url=redis_url, data_dir=data_dir, model=model)
    from mcp_server.agents import run_stdio

    asyncio.run(run_stdio(settings))
