"""Partition statistics: policies that hold only data sums, and their sum.

A learner keeps, per partition it owns and per scope key (``"shared"``, or
``"tenant:<id>"`` for decisions made under an isolated tenant's policy), a
:class:`~bandit.LinUCB` with no prior knowledge and no drift detection: a pure sum of
``x x^T``, ``r x``, ``r^2`` and counts. Sums are what make the scale-out exact: the
statistics of all partitions add up (:meth:`bandit.Policy.merge`) to those of one
process that saw every event, whichever learner applied which partition.

Drift detection and forgetting are off in the partition statistics: ADWIN's rescaling
depends on the order events are seen in, which a partitioned stream does not preserve
(see docs/streams.md).

The scoring rule is not part of the sums, so one set of statistics serves every policy
kind: :func:`recast` turns the LinUCB carrier into any registered policy class.
"""

from __future__ import annotations

from collections.abc import Iterable

from bandit import LinUCB, Policy

__all__ = ["SHARED_KEY", "new_statistics", "recast", "sum_statistics", "scope_key"]

SHARED_KEY = "shared"


def scope_key(scope: str, tenant_id: str) -> str | None:
    """The extra statistics key a decision's feedback also feeds (None: shared only)."""
    return f"tenant:{tenant_id}" if scope == "isolated" else None


def new_statistics(dim: int) -> Policy:
    """An empty statistics carrier: no arms yet, no drift detector, no forgetting.

    >>> new_statistics(4).arms
    []
    """
    return LinUCB(dim, drift_delta=None, half_life_hours=None, seed=0)


def recast(stats: Policy, cls: type[Policy], **config: object) -> Policy:
    """The same data sums and arms as ``stats``, as a ``cls`` policy with ``config``.

    Goes through the public serialization (``Policy.from_bytes(..., as_class=cls)``):
    the sums are class-independent.

    >>> import numpy as np
    >>> from bandit import LinearThompson
    >>> s = new_statistics(2); s.add_arm("a"); s.update("a", [1.0, 0.0], {"quality": 1.0})
    >>> t = recast(s, LinearThompson)
    >>> type(t).__name__, t.observations("a")["quality"]
    ('LinearThompson', 1)
    """
    return Policy.from_bytes(stats.to_bytes(derived=False), as_class=cls, **config)


def sum_statistics(parts: Iterable[Policy], dim: int) -> Policy:
    """The sum of several partitions' statistics (one carrier)."""
    total = new_statistics(dim)
    for part in parts:
        total.merge(part)
    return total
