"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import contextlib
import hmac

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.config import Settings
from service.db.engine import is_at_head
from service.deps import MetricsDep, ServiceDep, SettingsDep, bearer_key
from service.errors import Problem
from service.routing import RoutingService

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(service: ServiceDep) -> dict[str, str]:
    """``ready``; ``degraded`` (200) while the database is unreachable: decisions are
    still served from memory and written when it is back, feedback is kept in a bounded
    buffer (503 with Retry-After when full), admin calls answer 503 with Retry-After;
    also ``degraded`` while another part is away (``RoutingService.degraded``: buffered
    feedback not stored yet, the broker in distributed mode); 503 when the migrations
    are not at head."""
    try:
        with service.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        at_head = is_at_head(service.engine)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the database
        # Still in rotation: a load balancer that took every replica out during a
        # database blip would turn a feedback outage into a routing outage.
        return {"status": "degraded",
                "database": f"unreachable: {type(exc).__name__}",
                "serving": service.outage_serving()}
    if not at_head:
        raise Problem(503, "database migrations are not at head; run 'bandit-router migrate'",
                      slug="not-ready")
    away = service.degraded()  # e.g. the broker, in distributed mode
    if away:
        # The database answers us: whatever waits for it retries now, not at the end of
        # its backoff (ready sooner after an outage).
        service.database_answers()
        return {"status": "degraded", **away}
    return {"status": "ready"}


def _may_read_metrics(request: Request, settings: Settings, service: RoutingService) -> None:
    """``/metrics`` names tenants and their spend: the admin key or the metrics token
    (``BANDIT_ROUTER_METRICS_TOKEN``, for a scraper) unless ``METRICS_PUBLIC`` is set."""
    if settings.metrics_public:
        return
    refused = Problem(401, "missing or unknown key: /metrics needs 'Authorization: Bearer "
                      "<admin key or metrics token>'; set BANDIT_ROUTER_METRICS_PUBLIC=true "
                      "to serve it without one", headers={"WWW-Authenticate": "Bearer"})
    try:
        key = bearer_key(request)
    except Problem:
        raise refused from None
    token = settings.metrics_token
    if token is not None and hmac.compare_digest(key.encode(),
                                                 token.get_secret_value().encode()):
        return
    if service.is_admin_key(key):
        return
    if service.tenant_for_key(key) is not None:
        raise Problem(403, "/metrics needs the admin key or the metrics token "
                      "(BANDIT_ROUTER_METRICS_TOKEN), not a tenant key")
    raise refused


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request, service: ServiceDep, settings: SettingsDep,
            m: MetricsDep) -> Response:
    """Prometheus metrics; needs the admin key or the metrics token (see settings)."""
    _may_read_metrics(request, settings, service)
    service.export_gauges()
    for tenant in list(service.tenants.values()):
        for period, budget in (("day", tenant.budget_usd_per_day),
                               ("month", tenant.budget_usd_per_month)):
            if budget is None:
                # No budget: no series (a dashboard then draws spend alone).
                with contextlib.suppress(KeyError):
                    m.budget.remove(tenant.id, period)
            else:
                m.budget.labels(tenant.id, period).set(budget)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
