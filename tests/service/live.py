"""A real service on a loopback socket: uvicorn in a thread, on a free port (port 0).

Used by the client, command-line and status-page tests, which talk HTTP over a real
socket exactly as a gateway would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings


@contextmanager
def live_server(settings: Settings, timeout_s: float = 30.0,
                prepare: Callable[[FastAPI], None] | None = None) -> Iterator[str]:
    """Start the app built from ``settings`` (``prepare`` may add to it first); yields
    its base URL; stops it on exit."""
    app = create_app(settings)
    if prepare is not None:
        prepare(app)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                            lifespan="on")
    server = uvicorn.Server(config)
    # The test's thread owns signals; a server in another thread must not install handlers.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the service failed to start; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the service did not start within {timeout_s} s")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
