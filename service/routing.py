"""The routing service: the components of the routing core, plugged together.

One :class:`RoutingService` per app (``app.state.routing``); the routes call it. It owns
no state of its own: each part is a module with one responsibility, and the arrows
point one way (``service/`` has no import circle; tests/service/test_layout.py checks)::

    registry  (models, tenants, admin keys)  --publishes changes to-->  policy store
    policy store  (policies; apply, install)  <--hands applied outcomes--  feedback sink
    decider  (context, candidates, decide, reserve)  reads registry + policy store
    spending  (ledgers' sync, usage)  reads registry + writer
    statistics source  restores / saves the policy store (checkpoints, or the learners')

Embedded and distributed mode differ only by two plugged components
(:class:`service.components.Components`): the **feedback sink**
(:class:`service.ingest.FeedbackIngest`, store then apply; or distributed mode's Kafka
producer) and the **statistics source**
(:class:`service.checkpoints.Checkpoints`; or the learners' statistics followed from
PostgreSQL). :func:`build_routing` picks them from the settings.

Locks: the state lock (``registry.lock`` = ``policies.lock``) guards the registry's caches
and the policies, and is held only for in-memory work (microseconds), never across I/O.
``policies.apply_lock`` serializes store-then-apply of feedback and checkpoints; it is
taken before the state lock.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sqlalchemy import Engine

from bandit import Policy, Preferences
from bandit.base import check_finite_number
from service.components import Components, Core, build_core, embedded
from service.config import Settings
from service.decider import Decider
from service.domain import (
    POLICY_KINDS,
    DecideArgs,
    FeedbackReceipt,
    ModelState,
    PendingDecision,
    TenantState,
)
from service.ingest import FeedbackIngest
from service.metrics import Metrics
from service.spend import Spending
from service.spool import FeedbackSpool

__all__ = ["RoutingService", "build_routing", "TenantState", "ModelState", "PendingDecision",
           "DecideArgs", "FeedbackReceipt", "POLICY_KINDS"]

log = logging.getLogger("service.routing")


def build_routing(settings: Settings, engine: Engine, metrics: Metrics) -> RoutingService:
    """The service for the settings: distributed when ``kafka_bootstrap`` is set."""
    core = build_core(settings, engine, metrics)
    if settings.kafka_bootstrap:
        # Imported here so that the embedded default never loads the Kafka client.
        from service.distributed import distributed

        return RoutingService(core, distributed(core))
    return RoutingService(core, embedded(core))


class RoutingService:
    def __init__(self, core: Core, components: Components) -> None:
        self.settings, self.engine, self.metrics = core.settings, core.engine, core.metrics
        self.registry, self.policies, self.writer = core.registry, core.policies, core.writer
        self.history = core.history
        self.context_dim = core.context_dim
        self.prototype_map = core.prototype_map
        self.sink = components.sink
        self.statistics = components.statistics
        self.spending = Spending(core.engine, core.registry, core.writer)
        self.decider = Decider(core.settings, core.registry, core.policies, core.writer,
                               core.metrics, context_dim=core.context_dim,
                               prototype_map=core.prototype_map,
                               on_queued=components.on_queued)

    # ================================================================= start / stop
    def start(self) -> str | None:
        """Load everything from the database; returns a newly generated admin key, if any."""
        admin_key = self.registry.load()
        self.statistics.load()
        self.spending.load()
        # Load the featurizer now (a sentence-embedding model takes seconds), not on the
        # first text query.
        self.decider.featurize("warm up")
        # Replicas (and learners) must agree on this; the spec names the featurizer and
        # the map's digest, so a log search shows a replica with another file.
        log.info("contexts: %s, %d dimensions",
                 getattr(self.decider.featurizer, "spec", "?"), self.context_dim)
        self.writer.start()
        self.sink.start()
        self.statistics.start()
        return admin_key

    def stop(self) -> None:
        self.sink.stop()
        self.writer.stop()
        self.sink.close()
        self.statistics.stop()

    def checkpoint(self, *, force: bool = False) -> bool:
        return self.statistics.checkpoint(force=force)

    def refresh_registry(self) -> None:
        """Pick up models and tenants changed through another replica (same database),
        and bring the budgeted tenants' spend up to date with every replica's.

        Run periodically by the app (``registry_refresh_s``)."""
        self.registry.refresh()
        self.spending.sync()

    # ================================================================= the state
    @property
    def shared(self) -> dict[str, Policy]:
        return self.policies.shared

    @property
    def isolated(self) -> dict[str, dict[str, Policy]]:
        return self.policies.isolated

    @property
    def last_feedback_id(self) -> int:
        return self.policies.last_feedback_id

    @property
    def models(self) -> dict[str, ModelState]:
        return self.registry.models

    @property
    def tenants(self) -> dict[str, TenantState]:
        return self.registry.tenants

    @property
    def spool(self) -> FeedbackSpool | None:
        """Embedded mode's outage buffer (None without one, and in distributed mode)."""
        return self.sink.spool if isinstance(self.sink, FeedbackIngest) else None

    # ================================================================= registry
    def tenant_for_key(self, key: str) -> TenantState | None:
        return self.registry.tenant_for_key(key)

    def is_admin_key(self, key: str) -> bool:
        return self.registry.is_admin_key(key)

    def list_models(self, include_deleted: bool = False) -> list[tuple[ModelState, bool]]:
        return self.registry.list_models(include_deleted)

    def get_model(self, name: str) -> ModelState:
        return self.registry.get_model(name)

    def create_model(self, name: str, input_price: float, output_price: float,
                     enabled: bool, prior_quality: float | None) -> ModelState:
        return self.registry.create_model(name, input_price, output_price, enabled,
                                          prior_quality)

    def update_model(self, name: str, changes: dict[str, Any]) -> ModelState:
        return self.registry.update_model(name, changes)

    def delete_model(self, name: str) -> None:
        self.registry.delete_model(name)

    def prior_cost(self, input_price: float, output_price: float) -> float:
        return self.registry.prior_cost(input_price, output_price)

    def create_tenant(self, name: str) -> tuple[TenantState, str]:
        return self.registry.create_tenant(name)

    def update_preferences(self, tenant: TenantState, changes: dict[str, Any]) -> TenantState:
        return self.registry.update_preferences(tenant, changes)

    def usage(self, tenant: TenantState) -> dict[str, Any]:
        return self.spending.usage(tenant)

    def sync_spend(self) -> None:
        self.spending.sync()

    # ================================================================= decide
    def featurize(self, text: str) -> np.ndarray:
        return self.decider.featurize(text)

    def context_from(self, text: str | None, embedding: list[float] | None) -> np.ndarray:
        return self.decider.context_from(text, embedding)

    def decide(self, tenant: TenantState, x: np.ndarray, candidates: list[str] | None,
               override: Preferences | None) -> PendingDecision:
        return self.decider.decide(tenant, x, candidates, override)

    def decide_many(self, requests: list[DecideArgs]) -> list[PendingDecision | Exception]:
        return self.decider.decide_many(requests)

    def enqueue(self, pending: PendingDecision) -> bool:
        return self.decider.enqueue(pending)

    def abandon(self, pending: PendingDecision) -> None:
        self.decider.abandon(pending)

    def release(self, pending: PendingDecision) -> None:
        self.decider.release(pending)

    def get_decision(self, tenant: TenantState, decision_id: str) -> dict[str, Any]:
        """One of the tenant's decisions with its feedback (waits for the writer)."""
        if self.writer.is_pending(decision_id):
            self.writer.wait_for(decision_id)
        return self.history.decision(tenant.id, decision_id)

    # ================================================================= feedback
    def feedback(self, tenant: TenantState, decision_id: str, outcome: dict[str, float | None],
                 event_id: str | None) -> FeedbackReceipt:
        """Hand one feedback to the sink, after the checks both modes share."""
        for key in ("cost_usd", "latency_ms"):
            if outcome.get(key) is not None:
                check_finite_number(key, outcome[key], low=0.0)
        return self.sink.submit(tenant, decision_id, outcome, event_id)

    def feedback_buffered(self) -> int:
        """Feedback events accepted and not yet stored in the database."""
        return self.sink.buffered()

    def drain_feedback(self, deadline: float | None = None) -> bool:
        """Embedded mode: store and apply the outage buffer now (True once empty)."""
        assert isinstance(self.sink, FeedbackIngest)
        return self.sink.drain(deadline)

    # ================================================================= health
    def outage_serving(self) -> str:
        """What callers get while the database is unreachable (for ``/readyz``)."""
        return self.sink.outage_serving()

    def degraded(self) -> dict[str, str]:
        """Parts other than the database that are away, for ``/readyz``: part -> what
        callers get meanwhile."""
        return {**self.sink.degraded(), **self.statistics.degraded()}

    def export_gauges(self) -> None:
        """Set the gauges read at scrape time (spend per tenant, writer queue depth,
        feedback buffer depth)."""
        self.metrics.queue_depth.set(self.writer.depth())
        self.metrics.feedback_buffer_depth.set(self.feedback_buffered())
        for tenant in list(self.tenants.values()):
            day, month = tenant.ledger.snapshot()
            self.metrics.spend.labels(tenant.id, "day").set(day)
            self.metrics.spend.labels(tenant.id, "month").set(month)
