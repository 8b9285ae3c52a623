"""Embedded mode: what it plugs into the core (:class:`service.components.Components`).

Feedback stored then applied in-process (:class:`~service.ingest.FeedbackIngest`),
checkpoints in the database (:class:`~service.checkpoints.Checkpoints`) and the local
copy a start during an outage serves from (:class:`~service.local.LocalCopy`).
Distributed mode's counterpart is :func:`service.distributed.distributed`.
"""

from __future__ import annotations

from service.checkpoints import Checkpoints
from service.components import Components, Core
from service.ingest import FeedbackIngest
from service.local import LocalCopy

__all__ = ["embedded"]


def embedded(core: Core) -> Components:
    """Feedback stored then applied in-process; checkpoints in the database; the local
    copy a start during an outage serves from."""
    local = LocalCopy(core.settings, core.registry, core.policies)
    return Components(
        sink=FeedbackIngest(core.settings, core.engine, core.registry, core.policies,
                            core.guards, core.writer, core.metrics, local),
        statistics=Checkpoints(core.settings, core.engine, core.policies, core.metrics,
                               local),
        local=local)
