"""Reading the decision log back (tables ``feedback`` joined with ``decisions``): for
the start-up replay (:mod:`service.checkpoints`), for rebuilding a tenant's isolated
policies (:mod:`service.policies`) and for ``GET /v1/decisions/{id}``. Read-only; no
state but the settings it checks the stored contexts against.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from bandit.featurize import PrototypeMap
from service.config import Settings
from service.db import models as m
from service.exceptions import NotFoundError
from service.features import ContextSettingsError

__all__ = ["FeedbackHistory"]


class FeedbackHistory:
    def __init__(self, settings: Settings, engine: Engine, context_dim: int,
                 prototype_map: PrototypeMap | None) -> None:
        self.settings = settings
        self.engine = engine
        self.context_dim = context_dim
        self.prototype_map = prototype_map

    def rows(self, after: int, limit: int, *, tenant_id: str | None = None,
             upto: int | None = None) -> list[Any]:
        """Feedback rows after ``after`` in id order (the order they were applied), each
        with its decision's model, context and ``created_at``."""
        q = (select(m.Feedback, m.Decision.model, m.Decision.context, m.Decision.created_at)
             .join(m.Decision, m.Decision.id == m.Feedback.decision_id)
             .where(m.Feedback.id > after).order_by(m.Feedback.id).limit(limit))
        if tenant_id is not None:
            q = q.where(m.Feedback.tenant_id == tenant_id)
        if upto is not None:
            q = q.where(m.Feedback.id <= upto)
        with Session(self.engine) as session:
            return list(session.execute(q).all())

    def context(self, context: bytes, fb: Any) -> np.ndarray:
        """A stored decision's context, refused (at start-up) if another setting made it."""
        x = np.frombuffer(context, dtype=np.float64)
        if x.size != self.context_dim:
            raise ContextSettingsError(
                f"the decision of feedback {fb.id} has a {x.size}-dimensional context, the "
                f"settings say {self.context_dim} ({self.dim_source()}): restore the "
                "settings it was decided with, or start on a fresh database")
        return x

    def dim_source(self) -> str:
        """Which settings make the context dimension (for the refusals' messages)."""
        if self.prototype_map is None:
            return "BANDIT_ROUTER_DIM; BANDIT_ROUTER_PROTOTYPE_MAP is unset"
        return (f"the k={self.prototype_map.k} prototypes of BANDIT_ROUTER_PROTOTYPE_MAP="
                f"{str(self.settings.prototype_map)!r}"
                + (" plus BANDIT_ROUTER_DIM" if self.prototype_map.include_base else ""))

    def decision(self, tenant_id: str, decision_id: str) -> dict[str, Any]:
        """One of the tenant's decisions with its feedback; another tenant's is not found
        exactly like a decision that does not exist."""
        with Session(self.engine) as session:
            decision = session.get(m.Decision, decision_id)
            if decision is None or decision.tenant_id != tenant_id:
                raise NotFoundError(f"decision {decision_id} does not exist",
                                    slug="decision-not-found")
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
                "created_at": m.as_utc(decision.created_at),
                "feedback": [{"event_id": f.event_id or None, "quality": f.quality,
                              "cost_usd": f.cost_usd, "latency_ms": f.latency_ms,
                              "received_at": m.as_utc(f.created_at)} for f in feedback],
            }
