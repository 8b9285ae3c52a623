"""Reading the decision log back (tables ``decisions`` and ``feedback``): for the
start-up replay (:mod:`service.checkpoints`), for rebuilding a tenant's isolated
policies (:mod:`service.policies`), for ``GET /v1/decisions/{id}`` and for pricing a
feedback's tokens. Read-only; a decision the writer still holds is waited for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from bandit import InvalidInputError
from bandit.pricing import request_cost
from service.db import models as m
from service.domain import TenantState
from service.exceptions import NotFoundError
from service.registry import Registry
from service.writer import DecisionWriter

__all__ = ["DecisionLog"]


@dataclass(frozen=True)
class DecisionLog:
    engine: Engine
    writer: DecisionWriter  # a decision it still holds is waited for
    registry: Registry  # prices tokens

    def feedback_rows(self, after: int, limit: int, *, tenant_id: str | None = None,
                      upto: int | None = None) -> list[Any]:
        """Feedback rows after ``after`` in id order (the order they were applied), each
        with its decision's model, context, ``created_at`` and predictions (the price
        estimate the decision used teaches the model's price correction)."""
        d = m.DecisionRow
        q = (select(m.Feedback, d.model, d.context, d.created_at, d.predictions)
             .join(m.DecisionRow, m.DecisionRow.id == m.Feedback.decision_id)
             .where(m.Feedback.id > after).order_by(m.Feedback.id).limit(limit))
        if tenant_id is not None:
            q = q.where(m.Feedback.tenant_id == tenant_id)
        if upto is not None:
            q = q.where(m.Feedback.id <= upto)
        with Session(self.engine) as session:
            return list(session.execute(q).all())

    def _tenant_decision(self, session: Session, tenant: TenantState,
                         decision_id: str) -> m.DecisionRow:
        """The tenant's decision (waiting for it if the writer still holds it); another
        tenant's is a 404 exactly like a decision that does not exist."""
        if self.writer.is_pending(decision_id):
            self.writer.wait_for(decision_id)
        decision = session.get(m.DecisionRow, decision_id)
        if decision is None or decision.tenant_id != tenant.id:
            raise NotFoundError(f"decision {decision_id} does not exist",
                                slug="decision-not-found")
        return decision

    def check_decision(self, tenant: TenantState, decision_id: str) -> None:
        """404 unless the decision is the tenant's (as :meth:`get_decision`)."""
        with Session(self.engine) as session:
            self._tenant_decision(session, tenant, decision_id)

    def get_decision(self, tenant: TenantState, decision_id: str) -> dict[str, Any]:
        """One of the tenant's decisions with its feedback; another tenant's is a 404
        exactly like a decision that does not exist."""
        with Session(self.engine) as session:
            decision = self._tenant_decision(session, tenant, decision_id)
            feedback = session.scalars(select(m.Feedback)
                                       .where(m.Feedback.decision_id == decision_id)
                                       .order_by(m.Feedback.id)).all()
            return {
                "decision_id": decision.id, "model": decision.model,
                "propensity": decision.propensity, "policy": decision.policy,
                "policy_version": int(decision.policy_version), "scope": decision.scope,
                "predictions": decision.predictions,
                "predicted_cost_usd": decision.predicted_cost_usd,
                "charged_usd": decision.charged_usd, "over_budget": decision.over_budget,
                "tags": decision.tags,
                "created_at": m.as_utc(decision.created_at),
                "feedback": [{"event_id": f.event_id or None, "quality": f.quality,
                              "cost_usd": f.cost_usd, "latency_ms": f.latency_ms,
                              "received_at": m.as_utc(f.created_at)} for f in feedback],
            }

    def price_tokens(self, tenant: TenantState, decision_id: str, input_tokens: int,
                     output_tokens: int) -> float:
        """USD cost of a decision's call from its token counts and the registry's prices
        of the model it chose (feedback that reports tokens instead of ``cost_usd``).
        404 for an unknown decision or another tenant's; a model since removed from the
        registry cannot be priced (422: send ``cost_usd``)."""
        with Session(self.engine) as session:
            name = self._tenant_decision(session, tenant, decision_id).model
        model = self.registry.models.get(name)
        if model is None:
            raise InvalidInputError("cost_usd", "is needed: the decision's model is no "
                                    "longer registered, so its tokens cannot be priced",
                                    name)
        return request_cost(model.input_price_per_mtok, model.output_price_per_mtok,
                            input_tokens, output_tokens)
