"""``bandit-router serve``: run the HTTP service with uvicorn."""

from __future__ import annotations

import gc

import typer


def tune_gc() -> None:
    """Fewer collections of the young generations (a decision allocates a few hundred
    objects). Together with the ``gc.freeze()`` after start-up (service.app) this took
    the p99 of decide at half load from ~40 ms to ~5 ms: the tail was full collections
    walking every object the imports and the policies had created."""
    gc.set_threshold(50_000, 50, 100)


def serve(host: str = typer.Option("127.0.0.1", help="Address to bind."),
          port: int = typer.Option(8000, help="Port to bind."),
          log_level: str = typer.Option("info", help="uvicorn log level.")) -> None:
    """Serve the API. Settings come from BANDIT_ROUTER_* environment variables; with none,
    data lives in ./data (SQLite) and an admin key is created and printed on first start."""
    import uvicorn

    from service.app import create_app
    from service.config import Settings

    tune_gc()
    # One worker: the embedded learner lives in this process (see service/README.md).
    uvicorn.run(create_app(Settings(), freeze_gc=True), host=host, port=port, log_level=log_level,
                workers=1)
