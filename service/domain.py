"""The value types the routing core's modules pass each other (no I/O, no state).

:class:`ModelState` and :class:`TenantState` are owned by :mod:`service.registry`,
:class:`PendingDecision` is made by :mod:`service.decider`, :class:`FeedbackReceipt` is
what a feedback sink answers (:mod:`service.ingest` embedded, :mod:`service.distributed`
with Kafka). Every module of the core imports these, none imports another's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

import numpy as np

from bandit import LinearThompson, LinUCB, Policy, Preferences, SelectiveThompson
from bandit.conservative import GuardState
from service.budget import Ledger
from service.db import models as m

__all__ = ["POLICY_KINDS", "POLICY_CLASSES", "ModelState", "TenantState", "PendingDecision",
           "DecideArgs", "FeedbackItem", "FeedbackReceipt", "periods", "timestamp",
           "stored_outcome", "price_estimate"]

POLICY_KINDS = ("linucb", "thompson", "select")
POLICY_CLASSES: dict[str, type[Policy]] = {"linucb": LinUCB, "thompson": LinearThompson,
                                           "select": SelectiveThompson}


@dataclass
class ModelState:
    name: str
    input_price_per_mtok: float
    output_price_per_mtok: float
    enabled: bool
    prior_quality: float | None
    prior_cost_usd: float
    #: Where POST /v1/chat/completions forwards its requests (service/gateway); the key is
    #: the value of the environment variable ``api_key_env`` names, never stored.
    base_url: str | None = None
    upstream_model: str | None = None
    api_key_env: str | None = None
    #: Registered after the first decision: added late to every policy (cold_start_by).
    added_late: bool = False


@dataclass
class TenantState:
    id: str
    name: str
    key_hash: str
    preferences: Preferences
    policy: str
    scope: str
    on_budget_exhausted: str
    ledger: Ledger = field(repr=False)
    #: Guarded exploration: the tenant's baseline model (None: off), the bound, since
    #: when the guard counts, and its state (the sum over the tenant's guarded decisions
    #: since then: rebuilt from the decision log at start, kept current by decides and
    #: feedback).
    baseline_model: str | None = None
    max_exploration_loss: float = 0.02
    guard_since: datetime | None = None
    guard_state: GuardState = field(default_factory=GuardState, repr=False)

    @property
    def budget_usd_per_day(self) -> float | None:
        return self.ledger.budget_day

    @property
    def budget_usd_per_month(self) -> float | None:
        return self.ledger.budget_month


@dataclass(frozen=True)
class PendingDecision:
    """A decision made and paid for (reserved), not yet queued for the writer."""

    response: dict[str, Any]
    row: dict[str, Any]
    tenant: TenantState
    explored: bool


class DecideArgs(NamedTuple):
    """What one decide request asks."""

    tenant: TenantState
    x: np.ndarray
    candidates: list[str] | None
    override: Preferences | None
    #: The prompt's length in tokens when known (from the text); None: the
    #: ``prior_input_tokens`` setting.
    input_tokens: int | None = None


class FeedbackItem(NamedTuple):
    """One feedback handed to a sink in a batch (``RoutingService.feedback_many``)."""

    tenant: TenantState
    decision_id: str
    outcome: dict[str, float | None]
    event_id: str | None


@dataclass(frozen=True)
class FeedbackReceipt:
    """What a feedback sink did with one feedback: ``applied``, ``duplicate``,
    ``buffered`` (embedded, database away) or ``queued`` (distributed)."""

    status: str
    feedback_id: int | None


def periods() -> tuple[datetime, datetime, datetime]:
    """Now, and the starts of the current UTC day and month (budgets' periods)."""
    now = datetime.now(UTC)
    day0 = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return now, day0, day0.replace(day=1)


def timestamp(value: datetime) -> float:
    """A stored time (naive UTC on SQLite) in seconds since the epoch."""
    return m.as_utc(value).timestamp()


def stored_outcome(fb: m.Feedback) -> dict[str, float | None]:
    """The outcome a stored feedback row reports."""
    return {"quality": fb.quality, "cost_usd": fb.cost_usd, "latency_ms": fb.latency_ms}


def price_estimate(model: str, predictions: dict[str, Any] | None) -> float | None:
    """The price estimate a decision used for its model (None for decisions made
    before estimates were recorded)."""
    prediction = (predictions or {}).get(model) or {}
    value = prediction.get("price_usd")
    return float(value) if isinstance(value, (int, float)) else None
