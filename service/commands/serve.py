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


def limit_blas_threads() -> None:
    """One BLAS thread. A decision multiplies (n, 65) matrices with small n: OpenBLAS's
    worker threads only contend with the event loop and the decision writer for the
    cores (a batch of 8 decisions took 3.5 ms with 2 threads, 0.1 ms with one)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - then OPENBLAS_NUM_THREADS=1 is the way
        return
    threadpool_limits(1)


def tune_process() -> None:
    """What ``serve`` sets for the whole process before the app starts."""
    tune_gc()
    limit_blas_threads()


def serve(host: str = typer.Option("127.0.0.1", help="Address to bind."),
          port: int = typer.Option(8000, help="Port to bind."),
          log_level: str = typer.Option("info", help="uvicorn log level."),
          access_log: bool = typer.Option(False, help="Log every request (costs about "
                                          "as much as the request itself)."),
          log_json: bool = typer.Option(True, "--log-json/--no-log-json",
                                        help="JSON log lines with the request id and, for "
                                        "access lines, the decision id; or uvicorn's "
                                        "text logs.")) -> None:
    """Serve the API. Settings come from BANDIT_ROUTER_* environment variables; with none,
    data lives in ./data (SQLite) and an admin key is created and printed on first start."""
    import uvicorn
    from pydantic import ValidationError

    from service.app import create_app
    from service.config import Settings

    try:
        settings = Settings()
    except ValidationError as err:
        # A setting out of range: say which, without a traceback.
        for e in err.errors():
            typer.echo(f"error: BANDIT_ROUTER_{'_'.join(map(str, e['loc'])).upper()}: "
                       f"{e['msg']}" if e["loc"] else f"error: {e['msg']}", err=True)
        raise typer.Exit(2) from None
    tune_process()
    # One worker: the embedded learner lives in this process (see service/README.md).
    # loop/http "auto" pick uvloop and httptools (dependencies of the package; uvloop is
    # not available on Windows): twice the requests per second of asyncio + h11.
    logging_args: dict[str, object] = {"access_log": access_log}
    if log_json:
        import logging
        import os

        # Loading the minilm model draws tqdm progress bars on stderr: plain text in a
        # JSON log. Both switches, before transformers or huggingface_hub is imported.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")

        from service.observability import configure_logging

        configure_logging(log_level)
        # The request-id middleware writes the access line (request and decision ids);
        # uvicorn's own would duplicate it.
        logging.getLogger("service.access").setLevel("INFO" if access_log else "WARNING")
        logging_args = {"access_log": False, "log_config": None}
    uvicorn.run(create_app(settings, freeze_gc=True), host=host, port=port, log_level=log_level,
                workers=1, loop="auto", http="auto", **logging_args)
