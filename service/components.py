"""The parts of the routing core both modes share (:class:`Core`), and the two a mode
plugs in (:class:`Components`: a feedback sink and a statistics source).

:func:`embedded` plugs in feedback stored then applied in-process
(:class:`~service.ingest.FeedbackIngest`) and checkpoints in the database
(:class:`~service.checkpoints.Checkpoints`); :func:`service.distributed.distributed`
plugs in a Kafka producer and the learners' statistics.
:class:`service.routing.RoutingService` runs whichever it is given, knowing neither.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Engine

from bandit.featurize import PrototypeMap
from service.checkpoints import Checkpoints
from service.config import Settings
from service.domain import FeedbackReceipt, TenantState
from service.features import context_dim, load_prototype_map
from service.history import FeedbackHistory
from service.ingest import FeedbackIngest
from service.metrics import Metrics
from service.policies import PolicyStore
from service.registry import Registry
from service.writer import DecisionWriter

__all__ = ["FeedbackSink", "StatisticsSource", "Core", "Components", "build_core",
           "embedded"]


class FeedbackSink(Protocol):
    """Where ``POST /v1/feedback`` goes."""

    def submit(self, tenant: TenantState, decision_id: str,
               outcome: dict[str, float | None], event_id: str | None) -> FeedbackReceipt: ...
    def start(self) -> None: ...  # after the decision writer started
    def stop(self) -> None: ...  # before the decision writer stops
    def close(self) -> None: ...  # after the decision writer stopped
    def buffered(self) -> int: ...
    def outage_serving(self) -> str: ...
    def degraded(self) -> dict[str, str]: ...


class StatisticsSource(Protocol):
    """Where the policy store's statistics come from, and go."""

    def load(self) -> None: ...  # at start, before the first decision
    def start(self) -> None: ...
    def stop(self) -> None: ...  # last: after the feedback sink closed
    def checkpoint(self, *, force: bool = False) -> bool: ...
    def degraded(self) -> dict[str, str]: ...


@dataclass
class Core:
    """The parts both modes share."""

    settings: Settings
    engine: Engine
    metrics: Metrics
    registry: Registry
    history: FeedbackHistory
    policies: PolicyStore
    writer: DecisionWriter
    context_dim: int
    prototype_map: PrototypeMap | None


@dataclass
class Components:
    """What a mode plugs in."""

    sink: FeedbackSink
    statistics: StatisticsSource
    #: Called with each decision row queued for the writer (the decisions topic).
    on_queued: Callable[[dict[str, Any]], None] | None = None


def build_core(settings: Settings, engine: Engine, metrics: Metrics) -> Core:
    # The map is loaded (and checked against BANDIT_ROUTER_DIM) first, so that a bad map
    # refuses the start before anything else is done.
    prototype_map = load_prototype_map(settings)
    dim = context_dim(settings, prototype_map)
    registry = Registry(settings, engine, threading.RLock())
    history = FeedbackHistory(settings, engine, dim, prototype_map)
    writer = DecisionWriter(engine, queue_size=settings.decision_queue_size,
                            batch_size=settings.decision_batch_size,
                            flush_interval_s=settings.decision_flush_interval_s)
    return Core(settings, engine, metrics, registry, history,
                PolicyStore(settings, registry, history, dim), writer, dim, prototype_map)


def embedded(core: Core) -> Components:
    """Feedback stored then applied in-process; checkpoints in the database."""
    return Components(
        sink=FeedbackIngest(core.settings, core.engine, core.registry, core.policies,
                            core.writer, core.metrics),
        statistics=Checkpoints(core.settings, core.engine, core.policies, core.metrics))


