"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.db.engine import is_at_head
from service.deps import MetricsDep, ServiceDep
from service.errors import Problem

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
def readyz(service: ServiceDep) -> dict[str, str]:
    """``ready``; ``degraded`` (200) while the database is unreachable: decisions are
    still served from memory and written when it is back, feedback and admin calls
    answer 503 with Retry-After; 503 when the migrations are not at head."""
    try:
        with service.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        at_head = is_at_head(service.engine)
    except Exception as exc:  # noqa: BLE001 - any failure to reach the database
        # Still in rotation: a load balancer that took every replica out during a
        # database blip would turn a feedback outage into a routing outage.
        return {"status": "degraded",
                "database": f"unreachable: {type(exc).__name__}",
                "serving": "decisions from memory; feedback refused with 503 + Retry-After"}
    if not at_head:
        raise Problem(503, "database migrations are not at head; run 'bandit-router migrate'",
                      slug="not-ready")
    return {"status": "ready"}


@router.get("/metrics")
def metrics(service: ServiceDep, m: MetricsDep) -> Response:
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
