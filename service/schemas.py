"""Request and response bodies of the HTTP API (pydantic v2)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from bandit.base import MAX_COST_USD, MAX_LATENCY_MS, MAX_WEIGHT
from bandit.conservative import MAX_LOSS_RANGE
from bandit.errors import InvalidInputError
from bandit.featurize import check_tags
from service.quality_defaults import ROUTER_EVENTS

#: Largest token count of one call that feedback accepts (far above any context window).
MAX_TOKENS = 100_000_000

__all__ = [
    "Query", "PreferenceWeights", "DecideRequest", "PredictionOut", "DecideResponse",
    "FeedbackRequest", "FeedbackResponse", "TenantPreferences", "TenantPreferencesUpdate",
    "ModelCreate", "ModelUpdate", "ModelOut", "TenantCreate", "TenantCreated", "UsageOut",
    "DecisionOut", "FeedbackOut",
]

# Numbers are strict (issue 14): JSON true/false is not 1/0, "1" is not 1; an integer is
# a number. Booleans are StrictBool: 0/1 are not booleans.
Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(strict=True, ge=0.0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)]
ModelName = Annotated[str, Field(min_length=1, max_length=200,
                                 pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")]
#: Ids and names that are stored: no control character (C0, DEL, C1). PostgreSQL's text
#: cannot hold NUL (it answered 500), and the others make logs and lookups ambiguous.
NO_CONTROL = r"^[^\x00-\x1f\x7f-\x9f]*$"
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=NO_CONTROL)]
PolicyKind = Literal["linucb", "thompson", "select"]
Scope = Literal["shared", "isolated"]
OnExhausted = Literal["cheapest", "reject"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _one_of(*fields: tuple[str, dict]) -> dict:
    """JSON Schema: exactly one of ``fields`` present with a non-null value."""
    return {"oneOf": [{"required": [name], "properties": {name: schema}}
                      for name, schema in fields]}


def _any_of(*fields: tuple[str, dict]) -> dict:
    """JSON Schema: at least one of ``fields`` present with a non-null value."""
    return {"anyOf": [{"required": [name], "properties": {name: schema}}
                      for name, schema in fields]}


class Query(_Body):
    """The query: its text (featurized by the service) or an embedding of length ``dim``
    (both go through the prototype map when one is configured)."""

    model_config = ConfigDict(json_schema_extra=_one_of(("text", {"type": "string"}),
                                                        ("embedding", {"type": "array"})))

    # No schema cap: BANDIT_ROUTER_MAX_TEXT_CHARS (service/limits.py) sets it, both ways.
    text: str | None = Field(None, min_length=1)
    embedding: list[Finite] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Query:
        if (self.text is None) == (self.embedding is None):
            raise ValueError("give exactly one of query.text or query.embedding")
        return self


Weight = Annotated[float, Field(strict=True, ge=0.0, le=MAX_WEIGHT, allow_inf_nan=False)]


class PreferenceWeights(_Body):
    """Weights as in :class:`bandit.Preferences`: quality points per unit of quality,
    per USD of cost and per second of latency; at least one above 0."""

    # JSON Schema of "not all zero" (quality defaults to 1, the others to 0).
    model_config = ConfigDict(json_schema_extra={"not": {
        "required": ["quality"], "properties": {
            name: {"maximum": 0} for name in ("quality", "cost", "latency")}}})

    quality: Weight = 1.0
    cost: Weight = 0.0
    latency: Weight = 0.0


def _check_tags(value: object) -> dict[str, str] | None:
    """bandit.featurize.check_tags as a pydantic error (422 naming ``tags``, the key and
    what is allowed)."""
    if value is None:
        return None
    try:
        return check_tags(value)
    except InvalidInputError as err:
        raise PydanticCustomError("invalid_tags", "{message}",
                                  {"message": str(err), "allowed": err.allowed}) from None


class DecideRequest(_Body):
    query: Query
    candidates: list[ModelName] | None = Field(None, min_length=1, max_length=1000)
    preferences: PreferenceWeights | None = None
    tags: dict[str, str] | None = Field(None, description=(
        "Where the request comes from, e.g. {\"app\": \"support-bot\", \"task\": "
        "\"code\"}: at most 16 tags, keys 1-64 characters (letters, digits, ._-:/), "
        "values 1-128 characters. Hashed into the context beside the text features."))

    check_tags = field_validator("tags", mode="before")(_check_tags)


class PredictionOut(BaseModel):
    quality: float
    cost_usd: float
    latency_ms: float
    utility: float
    uncertainty: float
    # null when the arm could not be chosen by the policy's main branch (a cold arm with
    # no declared quality, reachable only through the bounded cold-start share).
    score: float | None
    # The request's cost from the registry's prices before the call (prompt tokens and
    # prior_output_tokens); cost_usd is this times the correction learned from feedback.
    price_usd: float | None = None


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


def _drop_null(schema: dict) -> None:
    """JSON Schema of a field that may be left out but not null (see _refuse_null)."""
    branches = [b for b in schema.pop("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        schema.update(branches[0])
    elif branches:
        schema["anyOf"] = branches


#: A field that may be left out ("unchanged") but not sent as null.
NOT_NULL = Field(None, json_schema_extra=_drop_null)


def _refuse_null(value: object) -> object:
    """Left out means "unchanged"; an explicit null for a column that cannot be empty
    would reach the database as a NOT NULL violation (a 500): refuse it, naming the
    field."""
    if value is None:
        raise ValueError("may be left out, but not null")
    return value


def _whole_number(value: object) -> object:
    """A JSON integer, or a number with no fractional part (JSON Schema's "integer" admits
    5.0); never a boolean or a string."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise PydanticCustomError("int_from_float", "Input should be a valid integer, "
                                      "got a number with a fractional part")
        return int(value)
    return value


#: A token count of one call (feedback): a whole number in [0, MAX_TOKENS].
TokenCount = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKENS),
                       # Outermost, so it runs first (and the schema keeps the bounds).
                       BeforeValidator(_whole_number)]


class FeedbackRequest(_Body):
    model_config = ConfigDict(json_schema_extra={
        "anyOf": [*_any_of(("quality", {"type": "number"}), ("cost_usd", {"type": "number"}),
                           ("latency_ms", {"type": "number"}),
                           ("default_quality", {"type": "number"}))["anyOf"],
                  {"required": ["input_tokens", "output_tokens"]}],
        # The service prices a call from both counts: one alone is refused.
        "dependentRequired": {"input_tokens": ["output_tokens"],
                              "output_tokens": ["input_tokens"]},
        # Yours or a gateway's default, not both (a null counts as not given).
        "not": {"required": ["quality", "default_quality"],
                "properties": {"quality": {"type": "number"},
                               "default_quality": {"type": "number"}}},
        # failed (a gateway's failed call): with its quality, without a default_quality.
        "if": {"required": ["failed"], "properties": {"failed": {"const": True}}},
        "then": {"required": ["quality"],
                 "properties": {"quality": {"type": "number"},
                                "default_quality": {"type": "null"}}}})

    decision_id: UUID
    quality: Fraction | None = None
    # A gateway's quality for a successful call, provisional: learned after the tenant's
    # quality_wait_seconds unless a quality of the client's replaces it (docs/api.md).
    default_quality: Fraction | None = None
    # A gateway's quality for a FAILED call (with quality): learned at once and final, as
    # the router's gateway reports a failure: a later quality for the call is a 409.
    failed: Annotated[bool, Field(strict=True)] = False
    # Bounded like bandit's statistics (bandit.base.MAX_COST_USD / MAX_LATENCY_MS):
    # feedback is stored before it is applied, so what bandit would refuse must be
    # refused here, not stored and then failing at every replay.
    cost_usd: Annotated[float, Field(strict=True, ge=0.0, le=MAX_COST_USD,
                                     allow_inf_nan=False)] | None = None
    latency_ms: Annotated[float, Field(strict=True, ge=0.0, le=MAX_LATENCY_MS,
                                       allow_inf_nan=False)] | None = None
    event_id: Name | None = None
    # Token counts of the call: without cost_usd, the service prices them with the
    # registry's prices of the decision's model (both are then needed).
    input_tokens: TokenCount | None = NOT_NULL
    output_tokens: TokenCount | None = NOT_NULL

    refuse_null = field_validator("input_tokens", "output_tokens",
                                  mode="before")(_refuse_null)

    @field_validator("event_id")
    @classmethod
    def _not_the_routers(cls, value: str | None) -> str | None:
        """The router's own event ids (its outcome, its default) would be taken for its
        own quality (service/quality_defaults.py), not checked as a client's."""
        if value in ROUTER_EVENTS:
            reserved = ", ".join(sorted(ROUTER_EVENTS))
            raise PydanticCustomError("reserved_event_id", "{message}", {
                "message": f"event_id {value!r} is reserved for the router's own "
                           f"feedback ({reserved})",
                "allowed": f"any other id (not {reserved})"})
        return value

    @model_validator(mode="after")
    def _some_outcome(self) -> FeedbackRequest:
        tokens = self.input_tokens is not None or self.output_tokens is not None
        # The failed rule first: {"failed": true} alone is told what failed needs.
        if self.failed and (self.quality is None or self.default_quality is not None):
            raise _rule("failed", "a gateway's report of a failed call needs quality "
                        "(its final quality, e.g. 0) and no default_quality",
                        "failed: true with a quality and without default_quality")
        if (self.quality is None and self.cost_usd is None and self.latency_ms is None
                and self.default_quality is None and not tokens):
            raise _rule("body", "give at least one of quality, cost_usd, latency_ms, "
                        "default_quality, or input_tokens and output_tokens",
                        "at least one of quality, cost_usd, latency_ms, default_quality, "
                        "or input_tokens and output_tokens")
        if self.quality is not None and self.default_quality is not None:
            raise _rule("default_quality", "give quality (yours) or default_quality (a "
                        "gateway's provisional one), not both",
                        "quality or default_quality, not both")
        if tokens:
            for name in ("input_tokens", "output_tokens"):
                if getattr(self, name) is None:
                    raise _rule(name, f"{name} is needed with the other token count "
                                "(the service prices both)",
                                "input_tokens and output_tokens together")
        return self


def _rule(field: str, message: str, allowed: str) -> PydanticCustomError:
    """A rule between a body's fields, refused naming the field it blames and what is
    allowed (service.errors reads both from the context; a model validator's own
    location is the whole body)."""
    return PydanticCustomError("invalid_combination", "{message}",
                               {"message": message, "field": field, "allowed": allowed})


class FeedbackResponse(BaseModel):
    status: Literal["applied", "duplicate", "buffered", "pending"] = Field(description=(
        "pending: only a default_quality was given; it is learned after the tenant's "
        "quality_wait_seconds unless a quality replaces it. "
        "applied: stored and learned from. duplicate: this (decision_id, event_id) was "
        "received before; nothing changed. buffered: the database is unreachable; the "
        "feedback is kept in the service's bounded on-disk buffer and stored and applied "
        "when the database is back (then exactly as if it had been sent then: a repeat "
        "is a duplicate, an unknown decision or another tenant's is dropped)."))
    decision_id: str
    event_id: str | None


# Prices in USD per million tokens. The bound is far above any real price (a few hundred
# USD) and keeps the derived prior cost inside what bandit's statistics accept.
Price = Annotated[float, Field(strict=True, ge=0.0, le=1e5, allow_inf_nan=False)]


ExplorationLoss = Annotated[float, Field(strict=True, ge=MAX_LOSS_RANGE[0], le=MAX_LOSS_RANGE[1],
                                         allow_inf_nan=False)]


class TenantPreferences(BaseModel):
    weights: PreferenceWeights
    policy: PolicyKind
    scope: Scope
    budget_usd_per_day: float | None
    budget_usd_per_month: float | None
    on_budget_exhausted: OnExhausted
    baseline_model: str | None = Field(description=(
        "The model the tenant would call without the router; null: no guard."))
    max_exploration_loss: float = Field(description=(
        "With a baseline: how far the router's cumulative reward may fall below the "
        "baseline's, as a fraction of the baseline's cumulative reward, in [0, 1]."))


class TenantPreferencesUpdate(_Body):
    """Fields left out keep their current value; ``null`` clears a budget."""

    # NOT_NULL: null is refused (_refuse_null), so the schema does not offer it.
    weights: PreferenceWeights | None = NOT_NULL
    policy: PolicyKind | None = NOT_NULL
    scope: Scope | None = NOT_NULL
    budget_usd_per_day: NonNegative | None = None
    budget_usd_per_month: NonNegative | None = None
    on_budget_exhausted: OnExhausted | None = NOT_NULL
    # null turns guarded exploration off; a name must be a registered model.
    baseline_model: ModelName | None = None
    max_exploration_loss: ExplorationLoss | None = NOT_NULL

    refuse_null = field_validator("weights", "policy", "scope", "on_budget_exhausted",
                                  "max_exploration_loss", mode="before")(_refuse_null)


#: An OpenAI-compatible API's base URL, as the OpenAI SDK takes it (".../v1"). No space
#: and no control character: it is stored as text (PostgreSQL answered 500 for a NUL) and
#: no HTTP client would call it.
BaseUrl = Annotated[str, Field(min_length=8, max_length=2000,
                               pattern=r"^https?://[^\s\x00-\x1f\x7f-\x9f]+$",
                               description="OpenAI-compatible base URL, e.g. "
                               "https://api.openai.com/v1 (POST <base_url>/chat/completions)")]
UpstreamModel = Annotated[str, Field(min_length=1, max_length=200, pattern=NO_CONTROL,
                                     description="The model name the upstream knows "
                                     "(default: the registered name)")]
#: The NAME of an environment variable of the router's process; the key is never sent.
EnvName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                               description="Name of the environment variable holding the "
                               "upstream's API key (the key itself is never stored)")]


class ModelCreate(_Body):
    name: ModelName
    input_price_per_mtok: Price
    output_price_per_mtok: Price
    enabled: StrictBool = True
    prior_quality: Fraction | None = None
    # Where POST /v1/chat/completions forwards (docs/api.md, "OpenAI-compatible endpoint").
    base_url: BaseUrl | None = None
    upstream_model: UpstreamModel | None = None
    api_key_env: EnvName | None = None


class ModelUpdate(_Body):
    """Fields left out keep their value; ``prior_quality: null`` clears the prior."""

    input_price_per_mtok: Price | None = NOT_NULL
    output_price_per_mtok: Price | None = NOT_NULL
    enabled: StrictBool | None = NOT_NULL
    prior_quality: Fraction | None = None
    # null clears (no upstream: the model is not a candidate of /v1/chat/completions).
    base_url: BaseUrl | None = None
    upstream_model: UpstreamModel | None = None
    api_key_env: EnvName | None = None

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
    base_url: str | None = None
    upstream_model: str | None = None
    # The variable's name only: the key is never returned.
    api_key_env: str | None = None


class TenantCreate(_Body):
    name: Name


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
    tags: dict[str, str] | None = None


class UsageOut(BaseModel):
    tenant_id: str
    spend_usd_today: float
    spend_usd_month: float
    budget_usd_per_day: float | None
    budget_usd_per_month: float | None
    decisions_today: int
    decisions_month: int
    model_share_month: dict[str, float]


# ------------------------------------------------ POST /v1/chat/completions settings
AliasName = Annotated[str, Field(min_length=1, max_length=64,
                                 pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


class GatewayAlias(_Body):
    """``model: "auto:<name>"`` routes with these weights (left out or null: the
    tenant's) among these candidates (left out or null: every model with an upstream)."""

    weights: PreferenceWeights | None = None
    candidates: list[ModelName] | None = Field(None, min_length=1, max_length=1000)


class GatewaySettingsOut(BaseModel):
    aliases: dict[str, GatewayAlias]
    fallback_attempts: int = Field(description=(
        "After an upstream failure, how many other models are tried (each its own "
        "decision) before the error is answered."))
    success_quality: float | None = Field(description=(
        "Quality the router reports itself for a successful call; null: only cost and "
        "latency (post the quality with POST /v1/feedback)."))
    quality_wait_seconds: float = Field(description=(
        "How long a successful call's success_quality waits for the client's own quality "
        "(POST /v1/feedback), which replaces it; learned when the wait is over."))


def _alias_map(schema: dict) -> None:
    """JSON Schema of the aliases: pydantic says the name pattern as patternProperties
    (which lets any other name through unchecked); the service refuses other names, so
    the document says propertyNames and every value an alias."""
    _drop_null(schema)
    patterns = schema.pop("patternProperties", None)
    if patterns:
        ((pattern, value),) = patterns.items()
        schema["additionalProperties"] = value
        schema.setdefault("propertyNames", {})["pattern"] = pattern


class GatewaySettingsUpdate(_Body):
    """Fields left out keep their value; ``aliases`` replaces the whole mapping;
    ``success_quality: null`` turns the reported quality off."""

    aliases: dict[AliasName, GatewayAlias] | None = Field(
        None, max_length=100, json_schema_extra=_alias_map)
    fallback_attempts: Annotated[int, Field(strict=True, ge=0, le=5),
                                 BeforeValidator(_whole_number)] | None = NOT_NULL
    success_quality: Fraction | None = None
    quality_wait_seconds: Annotated[float, Field(strict=True, ge=0.0, le=86_400.0,
                                                 allow_inf_nan=False)] | None = NOT_NULL

    refuse_null = field_validator("aliases", "fallback_attempts", "quality_wait_seconds",
                                  mode="before")(_refuse_null)
