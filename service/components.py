"""The parts of the routing core both modes share (:class:`Core`), and the two a mode
plugs in (:class:`Components`: a feedback sink and a statistics source).

:func:`service.embedded.embedded` plugs in feedback stored then applied in-process
(:class:`~service.ingest.FeedbackIngest`) and checkpoints in the database
(:class:`~service.checkpoints.Checkpoints`), with the local copy a start during an
outage serves from; :func:`service.distributed.distributed` plugs in a Kafka producer
and the learners' statistics. :class:`service.routing.RoutingService` runs whichever it
is given, knowing neither.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Engine

from service.budget_lease import BudgetLeases, budget_leases
from service.config import Settings
from service.decider import Decider
from service.domain import FeedbackReceipt, TenantState
from service.features import Contexts
from service.guards import Guards
from service.history import DecisionLog
from service.metrics import Metrics
from service.policies import PolicyStore
from service.registry import Registry
from service.spend import Spending
from service.spool import DecisionSpool, buffer_dir, spool_path
from service.writer import DecisionWriter

__all__ = ["FeedbackSink", "StatisticsSource", "LocalStore", "Core", "Components",
           "build_core"]


class FeedbackSink(Protocol):
    """Where ``POST /v1/feedback`` goes."""

    def submit(self, tenant: TenantState, decision_id: str,
               outcome: dict[str, float | None], event_id: str | None) -> FeedbackReceipt: ...
    def start(self) -> None: ...  # after the decision writer started
    def stop(self) -> None: ...  # before the decision writer stops
    def close(self) -> None: ...  # after the decision writer stopped
    def wake(self) -> None: ...  # the database answers again
    def buffered(self) -> int: ...
    def outage_serving(self) -> str: ...
    def degraded(self) -> dict[str, str]: ...


class StatisticsSource(Protocol):
    """Where the policy store's statistics come from, and go."""

    def load(self) -> bool: ...  # at start, before the first decision; True: save now
    def start(self) -> None: ...
    def stop(self) -> None: ...  # last: after the feedback sink closed
    def reloaded(self) -> None: ...  # after a reload from the database
    def checkpoint(self, *, force: bool = False) -> bool: ...
    def degraded(self) -> dict[str, str]: ...


class LocalStore(Protocol):
    """What a start during an outage serves from (embedded: :mod:`service.local`)."""

    degraded_since: str | None  # started from it while the database was away (when)
    database_back: threading.Event  # /readyz reached the database: retry now
    def start_from(self, exc: Exception) -> bool: ...  # False: nothing to start from
    def save(self, blobs: dict[str, bytes] | None = None) -> None: ...
    def wait_for_database(self, delay: float) -> None: ...
    def close(self) -> None: ...


@dataclass
class Core:
    """The parts both modes share."""

    settings: Settings
    engine: Engine
    metrics: Metrics
    contexts: Contexts
    registry: Registry
    history: DecisionLog
    policies: PolicyStore
    guards: Guards
    writer: DecisionWriter
    spending: Spending
    decider: Decider
    #: Budgets leased from PostgreSQL (service/budget_lease.py), or None.
    leases: BudgetLeases | None


@dataclass
class Components:
    """What a mode plugs in."""

    sink: FeedbackSink
    statistics: StatisticsSource
    #: Embedded mode's local copy (a start during an outage), else None.
    local: LocalStore | None = None
    #: Called with each decision row queued for the writer (the decisions topic).
    on_queued: Callable[[dict[str, Any]], None] | None = None


def build_core(settings: Settings, engine: Engine, metrics: Metrics) -> Core:
    # Built first: a bad prototype map refuses the start before anything else is done.
    contexts = Contexts(settings)
    leases = budget_leases(settings, engine.dialect.name)
    lock = threading.RLock()
    registry = Registry(settings, engine, lock, leases)
    url = settings.resolved_database_url()
    writer = DecisionWriter(
        engine, queue_size=settings.decision_queue_size,
        batch_size=settings.decision_batch_size,
        flush_interval_s=settings.decision_flush_interval_s,
        spool=DecisionSpool(spool_path(buffer_dir(settings), url, "decision-spool"),
                            settings.decision_buffer_size)
        if settings.decision_buffer_size > 0 else None,
        write_through=settings.decision_durability == "write-through",
        retry_max_s=settings.outage_retry_s)
    history = DecisionLog(engine, writer, registry)
    policies = PolicyStore(settings, registry, history, contexts)
    guards = Guards(engine, registry, metrics, lock)
    return Core(settings, engine, metrics, contexts, registry, history, policies, guards,
                writer, Spending(engine, registry, writer),
                Decider(settings, registry, policies, guards, writer, metrics), leases)
