"""What `up` and `serve` run: the ASGI server, worker child processes, the URLs they print.

The port is checked before anything starts: a second `up` on a busy port
says which port is taken and how to choose another, and exits 2, instead of
starting workers and an embedded server and then failing in uvicorn's bind.

The HTTP server bounds what a client can hold (`server_config`): at most
`http_max_connections` connections and requests in flight (past them, new
requests get 503), idle keep-alive connections close after
`http_keepalive_s`, request headers are limited to `MAX_HEADER_BYTES` (400
past it) and must arrive within `http_header_timeout_s` of the connection
(or, on a kept-alive one, of the request's first byte), else the connection
is answered 408 and closed. The close lingers (at most two seconds, reading
and dropping what the client still sends) so that a client still writing
its head reads the 408 instead of a reset. uvicorn has no header timeout of its own: without
one, a client sending a byte a second holds a connection for ever. The
timeout covers only the request head: a slow body upload, and a long
response such as an SSE stream, are not cut by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

import typer

from pipeline import Settings

if TYPE_CHECKING:
    import uvicorn

logger = logging.getLogger("embedstream")
EXIT_PORT_TAKEN = 2
MAX_HEADER_BYTES = 16 * 1024

OnStarted = Callable[[], Coroutine[Any, Any, None]]


def check_port(settings: Settings) -> None:
    """Exit 2 with a way out when the server's port cannot be bound."""
    host, port = settings.host, settings.port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: a port left in TIME_WAIT by a server that just stopped is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            why = ("is taken (another `embedstream up`?)" if exc.errno == errno.EADDRINUSE
                   else f"cannot be bound ({exc.strerror})")
            typer.echo(f"embedstream: port {port} on {host} {why}; choose another with "
                       f"--port 9000, EMBEDSTREAM_PORT=9000, or `make up PORT=9000`", err=True)
            raise typer.Exit(EXIT_PORT_TAKEN) from None


async def serve(settings: Settings, log_level: str, on_started: OnStarted | None = None) -> None:
    """Run the ASGI app on the settings' host and port until a stop signal."""
    from mcp_server.app import create_app

    config = server_config(create_app(settings), settings, log_level)
    await _server_class(on_started)(config).serve()


def server_config(app: Any, settings: Settings, log_level: str) -> uvicorn.Config:
    """uvicorn's configuration for `app`, with the connection bounds of the module docstring."""
    import uvicorn

    # log_config=None: uvicorn's loggers propagate to ours (text or JSON).
    return uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=log_level, log_config=None,
        lifespan="on", timeout_graceful_shutdown=5,
        http=header_timeout_protocol(settings.http_header_timeout_s),
        timeout_keep_alive=settings.http_keepalive_s,  # type: ignore[arg-type]  # a float works
        limit_concurrency=settings.http_max_connections,
        # X-Forwarded-* only from EMBEDSTREAM_TRUSTED_PROXIES (uvicorn would trust loopback).
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=list(settings.trusted_proxies) or None,
        h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def header_timeout_protocol(timeout_s: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head takes over `timeout_s`."""
    from embedstream.header_timeout import HeaderTimeoutProtocol

    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"timeout_s": timeout_s})


def _server_class(on_started: OnStarted | None = None) -> Any:
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


async def announce(settings: Settings, workers: int, models: list[str]) -> None:
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


def spawn_worker(settings: Settings, log_level: str, log_format: str,
                 threads: str) -> subprocess.Popen[bytes]:
    """Start `embedstream worker` as a child process for `settings.model`."""
    # Workers on one machine share its cores: without a thread cap each
    # would start one compute thread per core and they would oversubscribe.
    env = {"OMP_NUM_THREADS": threads, **os.environ,
           "EMBEDSTREAM_REDIS_URL": settings.redis_url or "",
           "EMBEDSTREAM_MODEL": settings.model, "EMBEDSTREAM_BACKEND": settings.backend,
           "EMBEDSTREAM_DEVICE": settings.device}
    return subprocess.Popen([sys.executable, "-m", "embedstream", "worker",
                             "--log-level", log_level, "--log-format", log_format], env=env,
                            start_new_session=True)


def stop_children(children: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each child (they drain), then wait; kill one that takes over 30 s."""
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
