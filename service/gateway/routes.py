"""The calling tenant's settings of ``POST /v1/chat/completions``, and the lifespan of
the gateway's state (its pooled HTTP client, settings cache and outcome sender)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Request

from bandit import InvalidInputError, Preferences
from bandit.availability import UpstreamAvailability
from service.config import Settings
from service.deps import ServiceDep, TenantDep
from service.gateway.feedback import DefaultApplier, FeedbackSender
from service.gateway.metrics import GatewayMetrics
from service.gateway.settings import Alias, GatewaySettingsStore, TenantGateway
from service.gateway.upstream import open_client
from service.quality_defaults import QualityDefaults
from service.routing import RoutingService
from service.schemas import (
    GatewayAlias,
    GatewaySettingsOut,
    GatewaySettingsUpdate,
    PreferenceWeights,
)

__all__ = ["Gateway", "router", "wire_defaults"]

log = logging.getLogger("service.gateway")


class Gateway:
    """The per-app state of the endpoint (``app.state.gateway``), built at start-up."""

    def __init__(self, settings: Settings, service: RoutingService,
                 store: GatewaySettingsStore) -> None:
        self.client = open_client(settings)
        self.timeout_s = settings.upstream_timeout_s
        self.settings = store
        # At least twice the writer's flush interval: most decisions are written before
        # their outcome is stored (see FeedbackSender). Not longer: a bigger batch costs
        # less CPU per outcome but holds the GIL longer; with 0.25 s (~25 outcomes at
        # 100 req/s) the router's added p99 was 3-4 ms worse than with batches of ~5 in
        # two A/B runs; 0.1 s saved 0.3-0.4 ms of CPU per request with no such loss.
        self.feedback = FeedbackSender(service, max_wait_s=max(
            0.1, 2 * settings.decision_flush_interval_s + 0.01))
        self.metrics = GatewayMetrics(service.metrics.registry, self.feedback.queued)
        # Which upstreams are failing, from every forwarded call (bandit/availability.py):
        # a model drawn down is left out of the decision's candidates.
        self.availability = UpstreamAvailability(seed=settings.policy_seed)
        assert service.quality_defaults is not None  # wire_defaults, before the start
        self.defaults = service.quality_defaults
        self.applier = DefaultApplier(service, self.defaults)

    async def aclose(self) -> None:
        await self.feedback.aclose()
        await self.client.close()


def wire_defaults(service: RoutingService) -> GatewaySettingsStore:
    """The gateway's settings cache, and its quality defaults wired into the service
    before it starts. A success's success_quality is provisional: the client's own
    quality replaces it (service/quality_defaults.py); the claims are made in
    RoutingService.feedback, and by embedded mode's buffer drain, which starts with the
    service (a previous run's buffer first: before, it was drained unclaimed). Until
    the cache is loaded (the gateway's lifespan) a quality claims a recorded row only."""
    store = GatewaySettingsStore(service.engine)

    def claims(tenant_id: str) -> bool:
        s = store.get(tenant_id)
        return s.success_quality is not None or s.records_defaults

    defaults = QualityDefaults(
        service.engine, claims, lambda tenant_id: store.get(tenant_id).quality_wait_seconds,
        lambda tenant_id: store.put(tenant_id, {"records_defaults": True}))
    service.quality_defaults = defaults
    if hasattr(service.sink, "defaults"):  # embedded mode's: buffered qualities claim
        service.sink.defaults = defaults
    return store


async def _reload(store: GatewaySettingsStore, interval_s: float) -> None:
    # Changes made through another replica reach this one within an interval.
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(store.load)
        except Exception:  # noqa: BLE001 - the cache stays; retried next interval
            log.warning("reloading the gateway settings failed", exc_info=True)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Nested in the app's lifespan (FastAPI merges an included router's): the routing
    # service exists already, and is stopped only after the queued outcomes are stored.
    settings: Settings = app.state.settings
    gateway = app.state.gateway = Gateway(settings, app.state.routing,
                                          app.state.gateway_settings)
    try:
        await asyncio.to_thread(gateway.settings.load)
    except Exception:  # noqa: BLE001 - a degraded start: defaults until the reload works
        log.warning("the gateway settings could not be loaded; defaults until the next "
                    "reload", exc_info=True)
    gateway.feedback.start()
    tasks = [asyncio.create_task(_reload(gateway.settings, settings.registry_refresh_s)),
             asyncio.create_task(gateway.applier.run(), name="gateway-defaults")]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await gateway.aclose()


router = APIRouter(prefix="/v1/tenants/me", tags=["tenants"], lifespan=lifespan)


def _out(state: TenantGateway) -> GatewaySettingsOut:
    def alias(a: Alias) -> GatewayAlias:
        w = a.weights
        return GatewayAlias(weights=None if w is None else PreferenceWeights(
            quality=w.quality, cost=w.cost, latency=w.latency),
            candidates=None if a.candidates is None else list(a.candidates))
    return GatewaySettingsOut(aliases={n: alias(a) for n, a in state.aliases.items()},
                              fallback_attempts=state.fallback_attempts,
                              success_quality=state.success_quality,
                              quality_wait_seconds=state.quality_wait_seconds)


async def _gateway(request: Request) -> Gateway:
    return request.app.state.gateway  # type: ignore[no-any-return]


GatewayDep = Annotated[Gateway, Depends(_gateway)]


@router.get("/gateway", response_model=GatewaySettingsOut)
async def get_gateway(tenant: TenantDep, gateway: GatewayDep) -> GatewaySettingsOut:
    """This tenant's settings of ``POST /v1/chat/completions``."""
    return _out(gateway.settings.get(tenant.id))


@router.put("/gateway", response_model=GatewaySettingsOut)
def put_gateway(body: GatewaySettingsUpdate, tenant: TenantDep, service: ServiceDep,
                gateway: GatewayDep) -> GatewaySettingsOut:
    """Change them; the next request uses them. Fields left out keep their value."""
    changes = body.model_dump(exclude_unset=True, exclude={"aliases"})
    if body.aliases is not None:
        aliases = {}
        for name, a in body.aliases.items():
            weights = None
            if a.weights is not None:
                weights = Preferences(a.weights.quality, a.weights.cost, a.weights.latency)
                try:
                    weights.validated()
                except InvalidInputError as err:
                    raise InvalidInputError(f"aliases.{name}.weights", err.allowed,
                                            a.weights.model_dump()) from None
            for model in a.candidates or []:
                if model not in service.models:
                    raise InvalidInputError(f"aliases.{name}.candidates", "unknown model; "
                                            "allowed: " + (", ".join(service.models)
                                                           or "(none registered)"), model)
            aliases[name] = Alias(weights, None if a.candidates is None
                                  else tuple(dict.fromkeys(a.candidates)))
        changes["aliases"] = aliases
    return _out(gateway.settings.put(tenant.id, changes))
