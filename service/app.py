"""The FastAPI application factory.

``create_app(settings)`` builds one independent app: its own engine, metrics registry,
policies and writer thread, all created in the lifespan, none at import time.

Start-up (lifespan): apply migrations (``alembic upgrade head``, same scripts for SQLite
and PostgreSQL), create the admin key on first start (printed once), load the newest
policy checkpoint and replay the feedback written after it, start the decision writer
and the periodic checkpoint task. Shutdown: drain the writer, write a final checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from service import gateway
from service.config import Settings
from service.db.engine import make_engine, upgrade
from service.errors import document_problems, install_error_handlers
from service.memory import then_release_free_memory
from service.metrics import Metrics
from service.middleware import ServiceMiddleware
from service.routes import (
    admin,
    admin_keys,
    admin_reservations,
    admin_state,
    admin_tenants,
    decide,
    decisions,
    feedback,
    health,
    tenants,
)
from service.routes import status as status_page
from service.routing import RoutingService

__all__ = ["create_app"]

log = logging.getLogger("service.app")


async def _every(interval: float, job: Callable[[], object], what: str) -> None:
    """Run ``job`` in a thread every ``interval`` seconds; a failure is logged and the
    loop goes on (a failed checkpoint only widens the replay window, a failed registry
    refresh is retried at the next tick)."""
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(job)
        except Exception:
            log.exception("%s failed", what)


def create_app(settings: Settings | None = None, *, freeze_gc: bool = False) -> FastAPI:
    """Build an app. ``freeze_gc`` (set by ``bandit-router serve``, a process-wide
    effect) moves everything alive after start-up out of the garbage collector's reach."""
    settings = settings if settings is not None else Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = settings.resolved_database_url()
        engine = make_engine(url)
        # Distributed mode (docs/streams.md) when kafka_bootstrap is set: the service
        # plugs in its components.
        service = RoutingService(settings, engine, app.state.metrics)
        if settings.kafka_bootstrap:
            if settings.run_migrations:
                await asyncio.to_thread(upgrade, url)
        else:
            if settings.run_migrations:
                # Run by start(); with the database unreachable, retried by the reload
                # after a degraded start from the local state.
                service.migrate = functools.partial(upgrade, url)
        # Before the start: embedded mode's buffer drain claims with them.
        app.state.gateway_settings = gateway.wire_defaults(service)
        generated = await asyncio.to_thread(service.start)
        if generated is not None:
            # Shown once: only its SHA-256 digest is stored.
            print(f"\n  bandit-router admin key (shown once, store it now): {generated}\n",
                  file=sys.stderr, flush=True)
        app.state.routing = service
        app.state.generated_admin_key = generated
        if freeze_gc:
            # What exists now (modules, policies, caches) lives as long as the process:
            # keep it out of the garbage collector's full collections, the source of the
            # latency tail (see service.commands.serve.tune_gc).
            gc.collect()
            gc.freeze()
        tasks = [asyncio.create_task(_every(settings.checkpoint_interval_s,
                                            then_release_free_memory(service.checkpoint),
                                            "periodic checkpoint")),
                 asyncio.create_task(_every(settings.registry_refresh_s,
                                            service.refresh_registry,
                                            "refreshing models and tenants"))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.to_thread(service.stop)
            engine.dispose()

    # FastAPIOffline: a FastAPI app whose /docs and /redoc load Swagger UI and ReDoc from
    # the installed package (under /static-offline-docs), not from a CDN.
    app = FastAPIOffline(title="bandit-router", version="0.1.0", lifespan=lifespan,
                         description="Online contextual-bandit router for LLM requests.",
                         routes=[decide.route(), gateway.route()])
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    # Request id, limits, the key before the body, the 500 answered: one middleware.
    app.add_middleware(ServiceMiddleware)
    app.include_router(gateway.router)
    for module in (feedback, decisions, tenants, admin, admin_tenants, admin_keys,
                   admin_reservations, admin_state, health, status_page):
        app.include_router(module.router)
    build_openapi = app.openapi

    def openapi() -> dict:
        # FastAPI's documented way to extend the schema ("Extending OpenAPI"); the
        # document is cached in app.openapi_schema, so this runs once.
        if app.openapi_schema is None:
            # The chat endpoint's errors are OpenAI's: documented after the problems.
            gateway.add_openapi(document_problems(decide.add_openapi(build_openapi(), settings)))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
