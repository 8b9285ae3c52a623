"""Spend: each tenant's ledger loaded from, and kept in step with, the decisions every
replica wrote (reads ``decisions.charged_usd``), and the usage report.

The ledgers themselves (:class:`service.budget.Ledger`, one per tenant) live on the
registry's tenants; the decider reserves from them, feedback ingest reconciles them.
This module owns the cache of the month's earlier days.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from service.db import models as m
from service.domain import TenantState, periods
from service.registry import Registry
from service.writer import DecisionWriter

__all__ = ["Spending"]


class Spending:
    def __init__(self, engine: Engine, registry: Registry, writer: DecisionWriter) -> None:
        self.engine = engine
        self.registry = registry
        self.writer = writer
        # (tenant, month start, day start) -> spend of the month's earlier days (sync)
        self._before_today: dict[tuple[str, datetime, datetime], float] = {}

    def load(self) -> None:
        """Every tenant's spend of this UTC day and month, at start."""
        _now, day0, month0 = periods()
        with Session(self.engine) as session:
            def sums(since: datetime) -> dict[str, float]:
                return dict(session.execute(
                    select(m.DecisionRow.tenant_id, func.sum(m.DecisionRow.charged_usd))
                    .where(m.DecisionRow.created_at >= since)
                    .group_by(m.DecisionRow.tenant_id)).all())
            day, month = sums(day0), sums(month0)
        for tenant in self.registry.tenants.values():
            tenant.ledger.load(float(day.get(tenant.id) or 0.0),
                               float(month.get(tenant.id) or 0.0))

    def forget_earlier_days(self) -> None:
        """Sum the month's earlier days again at the next :meth:`sync` (a release of
        stale reservations changed them)."""
        self._before_today.clear()

    def sync(self) -> None:
        """Budgets hold across replicas: reset each budgeted tenant's ledger to the spend
        every replica wrote, plus this replica's unwritten reservations
        (service/budget.py, "Several replicas"). One indexed sum per budgeted tenant."""
        budgeted = self.registry.budgeted()
        if not budgeted:
            return
        now, day0, month0 = periods()
        marks = {t.id: t.ledger.mark(now=now.timestamp()) for t in budgeted}
        unwritten = self.writer.pending_charges()  # before the sums: never missed
        spend = m.DecisionRow.charged_usd
        totals: dict[str, tuple[float, float]] = {}
        with Session(self.engine) as session:
            for t in budgeted:
                today = session.scalar(select(func.coalesce(func.sum(spend), 0.0)).where(
                    m.DecisionRow.tenant_id == t.id, m.DecisionRow.created_at >= day0))
                key = (t.id, month0, day0)
                before = self._before_today.get(key)
                if before is None:  # once a day per tenant: the month's earlier days
                    before = float(session.scalar(
                        select(func.coalesce(func.sum(spend), 0.0)).where(
                            m.DecisionRow.tenant_id == t.id, m.DecisionRow.created_at >= month0,
                            m.DecisionRow.created_at < day0)))
                    self._before_today = {k: v for k, v in self._before_today.items()
                                          if k[2] == day0}
                    self._before_today[key] = before
                extra = unwritten.get(t.id, 0.0)
                totals[t.id] = (float(today) + extra, before + float(today) + extra)
        for t in budgeted:
            t.ledger.sync(*totals[t.id], marks[t.id], now=now.timestamp())

    def usage(self, tenant: TenantState) -> dict[str, Any]:
        self.writer.flush(timeout=5.0)
        _now, day0, month0 = periods()
        with Session(self.engine) as session:
            per_model = dict(session.execute(
                select(m.DecisionRow.model, func.count())
                .where(m.DecisionRow.tenant_id == tenant.id, m.DecisionRow.created_at >= month0)
                .group_by(m.DecisionRow.model)).all())
            today = session.scalar(select(func.count()).select_from(m.DecisionRow).where(
                m.DecisionRow.tenant_id == tenant.id, m.DecisionRow.created_at >= day0)) or 0
        total = sum(per_model.values())
        day, month = tenant.ledger.snapshot()
        return {"tenant_id": tenant.id, "spend_usd_today": day, "spend_usd_month": month,
                "budget_usd_per_day": tenant.budget_usd_per_day,
                "budget_usd_per_month": tenant.budget_usd_per_month,
                "decisions_today": int(today), "decisions_month": int(total),
                "model_share_month": {k: v / total for k, v in sorted(per_model.items())}}
