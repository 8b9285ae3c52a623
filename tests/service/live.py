"""A real service on a loopback socket: uvicorn in a thread, on a free port (port 0).

Used by the client, command-line and status-page tests, which talk HTTP over a real
socket exactly as a gateway would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from tests.loopback import serve_asgi


@contextmanager
def live_server(settings: Settings, timeout_s: float = 30.0,
                prepare: Callable[[FastAPI], None] | None = None) -> Iterator[str]:
    """Start the app built from ``settings`` (``prepare`` may add to it first); yields
    its base URL; stops it on exit."""
    app = create_app(settings)
    if prepare is not None:
        prepare(app)
    with serve_asgi(app, "live-server", timeout_s, lifespan="on") as base_url:
        yield base_url
