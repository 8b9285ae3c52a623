"""``bandit-router serve``: run the HTTP service with uvicorn."""

from __future__ import annotations

import typer


def serve(host: str = typer.Option("127.0.0.1", help="Address to bind."),
          port: int = typer.Option(8000, help="Port to bind."),
          log_level: str = typer.Option("info", help="uvicorn log level.")) -> None:
    """Serve the API. Settings come from BANDIT_ROUTER_* environment variables; with none,
    data lives in ./data (SQLite) and an admin key is created and printed on first start."""
    import uvicorn

    from service.app import create_app
    from service.config import Settings

    # One worker: the embedded learner lives in this process (see docs/architecture.md).
    uvicorn.run(create_app(Settings()), host=host, port=port, log_level=log_level,
                workers=1)
