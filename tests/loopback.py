"""An ASGI app served by uvicorn in a thread on a free loopback port (port 0).

What the tests that talk HTTP over a real socket share: the live service
(tests/service/live.py) and the fake OpenAI-compatible upstream (tests/fakes).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

__all__ = ["serve_asgi"]


@contextmanager
def serve_asgi(app: Any, name: str, timeout_s: float = 30.0,
               **config: Any) -> Iterator[str]:
    """Serve ``app`` (extra ``config`` goes to ``uvicorn.Config``); yields its base URL
    ``http://127.0.0.1:<port>``; stops the server on exit."""
    config.setdefault("log_level", "warning")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, **config))
    # The test's thread owns signals; a server in another thread must not install handlers.
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"{name} failed to start; see the log above")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"{name} did not start within {timeout_s} s")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
