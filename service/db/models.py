"""SQLAlchemy 2 models: one schema for SQLite and PostgreSQL (see ``migrations/``)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "AdminKey", "Tenant", "Model", "DecisionRow", "Feedback",
           "GatewaySettings", "QualityDefault", "PolicyCheckpoint", "PolicySnapshot",
           "utcnow", "as_utc"]

# Named constraints so that alembic's batch mode (SQLite) can alter them.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY, not a BIGINT one.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class AdminKey(Base):
    __tablename__ = "admin_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    weight_quality: Mapped[float] = mapped_column(Float, default=1.0)
    weight_cost: Mapped[float] = mapped_column(Float, default=0.0)
    weight_latency: Mapped[float] = mapped_column(Float, default=0.0)
    policy: Mapped[str] = mapped_column(String(20))
    scope: Mapped[str] = mapped_column(String(20), default="shared")
    budget_usd_per_day: Mapped[float | None] = mapped_column(Float, nullable=True)
    budget_usd_per_month: Mapped[float | None] = mapped_column(Float, nullable=True)
    on_budget_exhausted: Mapped[str] = mapped_column(String(20), default="cheapest")
    # Guarded exploration (bandit.conservative): the model the tenant would call without
    # a router (None: no guard), how much of its cumulative reward exploration may cost,
    # and since when the guard counts (set when the baseline changes).
    baseline_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    max_exploration_loss: Mapped[float] = mapped_column(Float, default=0.02)
    guard_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                         nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Model(Base):
    """A model (arm). Deleting one sets ``deleted_at``: its decisions keep their history."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    input_price_per_mtok: Mapped[float] = mapped_column(Float)
    output_price_per_mtok: Mapped[float] = mapped_column(Float)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    prior_quality: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True),
                                                        nullable=True)
    # Where POST /v1/chat/completions forwards this model's requests (service/gateway):
    # an OpenAI-compatible base URL (".../v1"), the model name the upstream knows, and the
    # NAME of the environment variable holding its key (the key itself is never stored).
    base_url: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    upstream_model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    api_key_env: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # Registered after the first decision (a model added mid-stream): its policies count
    # its cold start per tag value (cold_start_by="added-on-tags"). Set once.
    added_late: Mapped[bool] = mapped_column(Boolean, default=False,
                                             server_default=false())


class DecisionRow(Base):
    __tablename__ = "decisions"
    __table_args__ = (Index("ix_decisions_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    model: Mapped[str] = mapped_column(String(200))
    policy: Mapped[str] = mapped_column(String(20))
    policy_version: Mapped[int] = mapped_column(BigInteger)
    scope: Mapped[str] = mapped_column(String(20))
    propensity: Mapped[float] = mapped_column(Float)
    # float64 little-endian bytes of the context (exactly what the policy saw).
    context: Mapped[bytes] = mapped_column(LargeBinary)
    predictions: Mapped[dict] = mapped_column(JSON)
    predicted_cost_usd: Mapped[float] = mapped_column(Float)
    # The chosen model's price estimate (declared prices x the request's tokens), which
    # the learners' price correction divides the reported cost by; None when unknown.
    price_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    # What the decision counts against the budget: predicted cost until feedback
    # reports the real one.
    charged_usd: Mapped[float] = mapped_column(Float)
    over_budget: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The request's tags (already hashed into ``context``; kept to show and to audit).
    tags: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    # Guarded decisions only: {"record": GuardRecord as a list, "outcome": the outcome
    # merged over its feedback so far, "reward": its reward}; the tenant's guard state
    # is the sum over these rows (rebuilt at start, service/routing.py).
    guard: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class Feedback(Base):
    """One feedback event. UNIQUE (decision_id, event_id) makes it apply exactly once.

    No foreign keys (migration 0003): the writers check the decision and its tenant
    themselves, and the per-row checks were most of the learners' cost of this table."""

    __tablename__ = "feedback"
    __table_args__ = (UniqueConstraint("decision_id", "event_id",
                                       name="uq_feedback_decision_event"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    decision_id: Mapped[str] = mapped_column(String(36))
    tenant_id: Mapped[str] = mapped_column(String(36), index=True)
    # "" when the caller sent none: one anonymous feedback per decision.
    event_id: Mapped[str] = mapped_column(String(200), default="")
    quality: Mapped[float | None] = mapped_column(Float, nullable=True)
    cost_usd: Mapped[float | None] = mapped_column(Float, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # The learners' consumer group that wrote the row (NULL: embedded mode): for that
    # group the row is the idempotency key (migration 0007, docs/streams.md).
    learner_group: Mapped[str | None] = mapped_column(String(200), nullable=True)


class GatewaySettings(Base):
    """A tenant's settings of ``POST /v1/chat/completions`` (no row: the defaults)."""

    __tablename__ = "gateway_settings"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    # alias name -> {"weights": {...} | None, "candidates": [...] | None}
    aliases: Mapped[dict] = mapped_column(JSON, default=dict)
    fallback_attempts: Mapped[int] = mapped_column(Integer, default=0)
    success_quality: Mapped[float | None] = mapped_column(Float, nullable=True)
    # How long a success's default quality waits for the client's (service/quality_defaults.py).
    quality_wait_seconds: Mapped[float] = mapped_column(Float, default=300.0)
    # A client posted a default_quality (POST /v1/feedback): claims on without success_quality.
    records_defaults: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class QualityDefault(Base):
    """A gateway call's quality reported by the router (migration 0011): a success's
    default, provisional until the client's quality replaces it or ``due_at`` passes; a
    failure's 0 (``final``). See :mod:`service.quality_defaults`."""

    __tablename__ = "quality_defaults"
    __table_args__ = (Index("ix_quality_defaults_state_due", "state", "due_at"),
                      Index("ix_quality_defaults_changed_at", "changed_at"))

    decision_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(36))
    # pending | replaced | applying | applied | final
    state: Mapped[str] = mapped_column(String(16))
    quality: Mapped[float | None] = mapped_column(Float, nullable=True)
    due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The client's event that replaced the default (state "replaced").
    event_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PolicyCheckpoint(Base):
    """A consistent snapshot of every in-process policy and the last feedback it includes."""

    __tablename__ = "policy_checkpoints"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_feedback_id: Mapped[int] = mapped_column(BigInteger)


class PolicySnapshot(Base):
    __tablename__ = "policy_snapshots"

    checkpoint_id: Mapped[int] = mapped_column(
        ForeignKey("policy_checkpoints.id", ondelete="CASCADE"), primary_key=True)
    # "shared:linucb", "tenant:<tenant id>:thompson"...
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
