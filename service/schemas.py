"""Request and response bodies of the HTTP API (pydantic v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bandit.base import MAX_COST_USD, MAX_LATENCY_MS

__all__ = [
    "Query", "PreferenceWeights", "DecideRequest", "PredictionOut", "DecideResponse",
    "FeedbackRequest", "FeedbackResponse", "TenantPreferences", "TenantPreferencesUpdate",
    "ModelCreate", "ModelUpdate", "ModelOut", "TenantCreate", "TenantCreated", "UsageOut",
    "DecisionOut", "FeedbackOut",
]

Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]
ModelName = Annotated[str, Field(min_length=1, max_length=200,
                                 pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")]
PolicyKind = Literal["linucb", "thompson"]
Scope = Literal["shared", "isolated"]
OnExhausted = Literal["cheapest", "reject"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Query(_Body):
    """The query: its text (featurized by the service) or an embedding of length ``dim``
    (both go through the prototype map when one is configured)."""

    # No schema cap: BANDIT_ROUTER_MAX_TEXT_CHARS (service/limits.py) sets it, both ways.
    text: str | None = Field(None, min_length=1)
    embedding: list[Finite] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Query:
        if (self.text is None) == (self.embedding is None):
            raise ValueError("give exactly one of query.text or query.embedding")
        return self


class PreferenceWeights(_Body):
    """Weights as in :class:`bandit.Preferences`: quality points per unit of quality,
    per USD of cost and per second of latency."""

    quality: NonNegative = 1.0
    cost: NonNegative = 0.0
    latency: NonNegative = 0.0


class DecideRequest(_Body):
    query: Query
    candidates: list[ModelName] | None = Field(None, min_length=1, max_length=1000)
    preferences: PreferenceWeights | None = None


class PredictionOut(BaseModel):
    quality: float
    cost_usd: float
    latency_ms: float
    utility: float
    uncertainty: float
    # null when the arm could not be chosen by the policy's main branch (a cold arm with
    # no declared quality, reachable only through the bounded cold-start share).
    score: float | None


class DecideResponse(BaseModel):
    decision_id: str
    model: str
    propensity: float
    explored: bool
    predictions: dict[str, PredictionOut]
    policy: str
    policy_version: int
    scope: Scope
    # True when the budget changed the choice (cheapest model, propensity 1).
    budget_limited: bool = False


class FeedbackRequest(_Body):
    decision_id: UUID
    quality: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    # Bounded like bandit's statistics (bandit.base.MAX_COST_USD / MAX_LATENCY_MS):
    # feedback is stored before it is applied, so what bandit would refuse must be
    # refused here, not stored and then failing at every replay.
    cost_usd: Annotated[float, Field(ge=0.0, le=MAX_COST_USD, allow_inf_nan=False)] | None = None
    latency_ms: Annotated[float, Field(ge=0.0, le=MAX_LATENCY_MS,
                                       allow_inf_nan=False)] | None = None
    event_id: str | None = Field(None, min_length=1, max_length=200)

    @model_validator(mode="after")
    def _some_outcome(self) -> FeedbackRequest:
        if self.quality is None and self.cost_usd is None and self.latency_ms is None:
            raise ValueError("give at least one of quality, cost_usd, latency_ms")
        return self


class FeedbackResponse(BaseModel):
    status: Literal["applied", "duplicate", "buffered"] = Field(description=(
        "applied: stored and learned from. duplicate: this (decision_id, event_id) was "
        "received before; nothing changed. buffered: the database is unreachable; the "
        "feedback is kept in the service's bounded on-disk buffer and stored and applied "
        "when the database is back (then exactly as if it had been sent then: a repeat "
        "is a duplicate, an unknown decision or another tenant's is dropped)."))
    decision_id: str
    event_id: str | None


# Prices in USD per million tokens. The bound is far above any real price (a few hundred
# USD) and keeps the derived prior cost inside what bandit's statistics accept.
Price = Annotated[float, Field(ge=0.0, le=1e5, allow_inf_nan=False)]


def _refuse_null(value: object) -> object:
    """Left out means "unchanged"; an explicit null for a column that cannot be empty
    would reach the database as a NOT NULL violation (a 500): refuse it, naming the
    field."""
    if value is None:
        raise ValueError("may be left out, but not null")
    return value


class TenantPreferences(BaseModel):
    weights: PreferenceWeights
    policy: PolicyKind
    scope: Scope
    budget_usd_per_day: float | None
    budget_usd_per_month: float | None
    on_budget_exhausted: OnExhausted


class TenantPreferencesUpdate(_Body):
    """Fields left out keep their current value; ``null`` clears a budget."""

    weights: PreferenceWeights | None = None
    policy: PolicyKind | None = None
    scope: Scope | None = None
    budget_usd_per_day: NonNegative | None = None
    budget_usd_per_month: NonNegative | None = None
    on_budget_exhausted: OnExhausted | None = None

    refuse_null = field_validator("weights", "policy", "scope", "on_budget_exhausted",
                                  mode="before")(_refuse_null)


class ModelCreate(_Body):
    name: ModelName
    input_price_per_mtok: Price
    output_price_per_mtok: Price
    enabled: bool = True
    prior_quality: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None


class ModelUpdate(_Body):
    """Fields left out keep their value; ``prior_quality: null`` clears the prior."""

    input_price_per_mtok: Price | None = None
    output_price_per_mtok: Price | None = None
    enabled: bool | None = None
    prior_quality: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None

    refuse_null = field_validator("input_price_per_mtok", "output_price_per_mtok", "enabled",
                                  mode="before")(_refuse_null)


class ModelOut(BaseModel):
    name: str
    input_price_per_mtok: float
    output_price_per_mtok: float
    enabled: bool
    prior_quality: float | None
    prior_cost_usd: float
    deleted: bool


class TenantCreate(_Body):
    name: str = Field(min_length=1, max_length=200)


class TenantCreated(BaseModel):
    id: str
    name: str
    api_key: str


class FeedbackOut(BaseModel):
    event_id: str | None
    quality: float | None
    cost_usd: float | None
    latency_ms: float | None
    received_at: datetime


class DecisionOut(BaseModel):
    decision_id: str
    model: str
    propensity: float
    policy: str
    policy_version: int
    scope: str
    predictions: dict[str, dict[str, float | None]]
    predicted_cost_usd: float
    charged_usd: float
    over_budget: bool
    created_at: datetime
    feedback: list[FeedbackOut]


class UsageOut(BaseModel):
    tenant_id: str
    spend_usd_today: float
    spend_usd_month: float
    budget_usd_per_day: float | None
    budget_usd_per_month: float | None
    decisions_today: int
    decisions_month: int
    model_share_month: dict[str, float]
