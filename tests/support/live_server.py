"""The app on a real loopback socket, in a thread of the test process.

`httpx.ASGITransport` buffers a whole response, so an endless SSE stream
(the feed) and a browser need a real server. Uvicorn runs in a thread with
its own event loop (no signal handlers are installed off the main thread);
the test talks to it over 127.0.0.1 like any client.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from mcp_server.app import create_app
from pipeline.settings import Settings

START_TIMEOUT_S = 20.0


@contextmanager
def live_server(settings: Settings, *, with_mcp: bool = True) -> Iterator[str]:
    """Serve the app for `settings` on a free loopback port; yields its base URL."""
    config = uvicorn.Config(create_app(settings, with_mcp=with_mcp), host="127.0.0.1", port=0,
                            log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the live server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
