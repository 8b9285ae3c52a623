"""Reservations: decisions whose feedback never reported a cost (admin key only).

A decide charges its predicted cost to the tenant's budget at once (``charged_usd``);
feedback with ``cost_usd`` replaces it with the real cost. A decision that never gets
such feedback stays charged at its prediction: kept on purpose, since the call was most
likely made and its prediction is the best estimate of what it cost. An operator who
knows better (a gateway that dropped its feedback, calls that were never made) lists
the reservations older than ``RESERVATION_STALE_HOURS`` and releases them: their
``charged_usd`` becomes 0 and the budgets get the money back (this replica at once, the
others at their next spend sync). Feedback with a cost that arrives later still charges
the real cost.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field
from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.orm import Session

from service.db import models as m
from service.deps import AdminDep, ServiceDep
from service.routes.admin_tenants import _tenant
from service.routing import RoutingService

router = APIRouter(prefix="/v1/admin/reservations", tags=["admin"])
# Ages up to a century: beyond, the cutoff would leave the calendar (an overflow).
MAX_HOURS = 24.0 * 365 * 100


class TenantReservations(BaseModel):
    tenant_id: str
    name: str
    decisions: int
    reserved_usd: float
    oldest: str


class Reservations(BaseModel):
    older_than_hours: float
    cutoff: str
    decisions: int
    reserved_usd: float
    tenants: list[TenantReservations]


class ReleaseRequest(BaseModel):
    older_than_hours: float | None = Field(None, gt=0.0, le=MAX_HOURS, allow_inf_nan=False,
                                           description="Default RESERVATION_STALE_HOURS.")
    tenant: str | None = Field(None, min_length=1, description="A tenant's id or name; "
                               "default every tenant.")


class Released(BaseModel):
    older_than_hours: float
    decisions: int
    released_usd: float


def _stale(service: RoutingService, hours: float | None,
           tenant_id: str | None) -> tuple[float, datetime, Any]:
    """The age limit, its cutoff time, and the condition of a stale reservation."""
    hours = service.settings.reservation_stale_hours if hours is None else hours
    cutoff = m.utcnow() - timedelta(hours=hours)
    costed = exists().where(and_(m.Feedback.decision_id == m.DecisionRow.id,
                                 m.Feedback.cost_usd.is_not(None)))
    condition = and_(m.DecisionRow.charged_usd > 0, m.DecisionRow.created_at < cutoff, ~costed)
    if tenant_id is not None:
        condition = and_(condition, m.DecisionRow.tenant_id == tenant_id)
    return hours, cutoff, condition


@router.get("", response_model=Reservations)
def list_reservations(_admin: AdminDep, service: ServiceDep,
                      older_than_hours: Annotated[float | None, Query(
                          gt=0.0, le=MAX_HOURS, allow_inf_nan=False)] = None,
                      tenant: Annotated[str | None, Query(min_length=1)] = None
                      ) -> Reservations:
    """Per tenant, the decisions older than ``older_than_hours`` (default
    ``RESERVATION_STALE_HOURS``) still charged at their predicted cost."""
    tenant_id = None if tenant is None else _tenant(service, tenant).id
    hours, cutoff, stale = _stale(service, older_than_hours, tenant_id)
    with Session(service.engine) as session:
        rows = session.execute(
            select(m.DecisionRow.tenant_id, func.count(), func.sum(m.DecisionRow.charged_usd),
                   func.min(m.DecisionRow.created_at))
            .where(stale).group_by(m.DecisionRow.tenant_id)).all()
    names = {t.id: t.name for t in list(service.tenants.values())}
    per_tenant = [TenantReservations(tenant_id=tid, name=names.get(tid, "?"), decisions=n,
                                     reserved_usd=float(total),
                                     oldest=m.as_utc(oldest).isoformat())
                  for tid, n, total, oldest in sorted(rows, key=lambda r: -float(r[2]))]
    return Reservations(older_than_hours=hours, cutoff=cutoff.isoformat(),
                        decisions=sum(t.decisions for t in per_tenant),
                        reserved_usd=sum(t.reserved_usd for t in per_tenant),
                        tenants=per_tenant)


@router.post("/release", response_model=Released)
def release_reservations(body: ReleaseRequest, _admin: AdminDep,
                         service: ServiceDep) -> Released:
    """Set the stale reservations' ``charged_usd`` to 0 and give the money back to the
    budgets of the periods they were charged to."""
    tenant_id = None if body.tenant is None else _tenant(service, body.tenant).id
    hours, _cutoff, stale = _stale(service, body.older_than_hours, tenant_id)
    # Under the feedback lock: this replica's feedback cannot reconcile one of these
    # decisions between the read and the update (its delta would be off by the release).
    with service.policies.apply_lock, Session(service.engine) as session, session.begin():
        rows = session.execute(select(m.DecisionRow.id, m.DecisionRow.tenant_id,
                                      m.DecisionRow.charged_usd, m.DecisionRow.created_at)
                               .where(stale)).all()
        for start in range(0, len(rows), 500):
            session.execute(update(m.DecisionRow)
                            .where(m.DecisionRow.id.in_([r.id for r in rows[start:start + 500]]))
                            .values(charged_usd=0.0))
    for row in rows:
        tenant = service.tenants.get(row.tenant_id)
        if tenant is not None:
            tenant.ledger.adjust(-float(row.charged_usd), m.as_utc(row.created_at).timestamp())
    # The month's spend before today is summed once a day per tenant (sync_spend); a
    # release may have changed it: sum again at the next sync.
    service.spending.forget_earlier_days()
    return Released(older_than_hours=hours, decisions=len(rows),
                    released_usd=sum(float(r.charged_usd) for r in rows))
