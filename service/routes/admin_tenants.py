"""Admin endpoints on existing tenants: list, rotate a key, read and change a tenant's
preferences, read its usage (admin key only). ``{tenant_id}`` is a tenant's id or its
name (a name two tenants share is refused with 409, naming their ids).

``POST /v1/admin/tenants`` (create) lives in :mod:`service.routes.admin`; these are what
the ``bandit-router tenants / preferences / usage`` commands need beyond it.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db import models as m
from service.deps import AdminDep, ServiceDep
from service.errors import Problem
from service.routes.tenants import _prefs
from service.routing import RoutingService, TenantState
from service.schemas import (
    PreferenceWeights,
    TenantCreated,
    TenantPreferences,
    TenantPreferencesUpdate,
    UsageOut,
)
from service.security import hash_key, new_key

router = APIRouter(prefix="/v1/admin/tenants", tags=["admin"])


class TenantOut(BaseModel):
    id: str
    name: str
    policy: str
    scope: str
    weights: PreferenceWeights
    budget_usd_per_day: float | None
    budget_usd_per_month: float | None
    on_budget_exhausted: str
    baseline_model: str | None
    max_exploration_loss: float
    # This replica's ledger: every replica's written spend as of the last registry
    # refresh, plus this replica's since (service/budget.py, "Several replicas").
    spend_usd_today: float
    spend_usd_month: float
    created_at: str


def _tenant(service: RoutingService, tenant_id: str) -> TenantState:
    """The tenant whose id, or else whose name, is ``tenant_id`` (404 if none, 409 if the
    name is shared: names are not unique, ids are)."""
    tenant = service.tenants.get(tenant_id)
    if tenant is not None:
        return tenant
    named = sorted((t for t in list(service.tenants.values()) if t.name == tenant_id),
                   key=lambda t: t.id)
    if len(named) == 1:
        return named[0]
    if named:
        raise Problem(409, f"{len(named)} tenants are named {tenant_id!r} (ids "
                      f"{', '.join(t.id for t in named)}): name one by its id",
                      slug="tenant-ambiguous")
    raise Problem(404, f"tenant {tenant_id!r} does not exist (no tenant has this id or "
                  "name)",
                  slug="tenant-not-found")


@router.get("", response_model=list[TenantOut])
def list_tenants(_admin: AdminDep, service: ServiceDep) -> list[TenantOut]:
    """Every tenant with its settings and this replica's spend (oldest first)."""
    with Session(service.engine) as session:
        created = {tid: at for tid, at in session.execute(
            select(m.Tenant.id, m.Tenant.created_at).order_by(m.Tenant.created_at))}
    out = []
    for tenant_id, at in created.items():
        tenant = service.tenants.get(tenant_id)
        if tenant is None:  # created on another replica, not refreshed here yet
            continue
        day, month = tenant.ledger.snapshot()
        p = tenant.preferences
        out.append(TenantOut(
            id=tenant.id, name=tenant.name, policy=tenant.policy, scope=tenant.scope,
            weights=PreferenceWeights(quality=p.quality, cost=p.cost, latency=p.latency),
            budget_usd_per_day=tenant.budget_usd_per_day,
            budget_usd_per_month=tenant.budget_usd_per_month,
            on_budget_exhausted=tenant.on_budget_exhausted,
            baseline_model=tenant.baseline_model,
            max_exploration_loss=tenant.max_exploration_loss, spend_usd_today=day,
            spend_usd_month=month, created_at=m.as_utc(at).isoformat()
            if isinstance(at, datetime) else str(at)))
    return out


@router.post("/{tenant_id:path}/rotate-key", response_model=TenantCreated)
def rotate_key(tenant_id: str, _admin: AdminDep, service: ServiceDep) -> TenantCreated:
    """A new API key for the tenant, shown in this answer only. The old key stops working
    on this replica at once, and on the other replicas on the same database at their next
    registry refresh (``RoutingService.refresh_registry`` re-keys a tenant whose stored
    key digest changed), i.e. within ``BANDIT_ROUTER_REGISTRY_REFRESH_S`` (5 s by
    default; measured 4.6 s in issue 17)."""
    tenant = _tenant(service, tenant_id)
    key = new_key("tenant")
    digest = hash_key(key)
    with Session(service.engine) as session, session.begin():
        session.execute(update(m.Tenant).where(m.Tenant.id == tenant.id)
                        .values(key_hash=digest, updated_at=m.utcnow()))
    service.registry.rekey(tenant, digest)
    return TenantCreated(id=tenant.id, name=tenant.name, api_key=key)


@router.get("/{tenant_id:path}/preferences", response_model=TenantPreferences)
def get_preferences(tenant_id: str, _admin: AdminDep, service: ServiceDep) -> TenantPreferences:
    return _prefs(_tenant(service, tenant_id))


@router.put("/{tenant_id:path}/preferences", response_model=TenantPreferences)
def put_preferences(tenant_id: str, body: TenantPreferencesUpdate, _admin: AdminDep,
                    service: ServiceDep) -> TenantPreferences:
    """As ``PUT /v1/tenants/me/preferences``, for the tenant named in the path."""
    tenant = _tenant(service, tenant_id)
    changes = body.model_dump(exclude_unset=True)
    if body.weights is not None:
        changes["weights"] = body.weights.model_dump()
    return _prefs(service.update_preferences(tenant, changes))


@router.get("/{tenant_id:path}/usage", response_model=UsageOut)
def get_usage(tenant_id: str, _admin: AdminDep, service: ServiceDep) -> UsageOut:
    return UsageOut(**service.usage(_tenant(service, tenant_id)))
