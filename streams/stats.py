"""Partition statistics: policies that hold only data sums, and their sum.

A learner keeps, per partition it owns and per scope key (``"shared"``, or
``"tenant:<id>"`` for decisions made under an isolated tenant's policy), a
:class:`~bandit.LinUCB` with no prior knowledge and no drift detection: a pure sum of
``x x^T``, ``r x``, ``r^2`` and counts. Sums are what make the scale-out exact: the
statistics of all partitions add up (:meth:`bandit.Policy.merge`) to those of one
process that saw every event, whichever learner applied which partition.

Drift detection is off in the partition statistics: ADWIN's rescaling depends on the
order events are seen in, which a partitioned stream does not preserve. Forgetting
(``half_life_hours``) is on when configured, by EVENT time (the decision's
``created_at``): each partition's sums are weighted to its own reference time, the
latest event time it has seen, and :func:`sum_statistics` decays every partition to a
common reference time before adding them, so the sum does not depend on which learner
applied which partition in which order (see docs/streams.md).

The scoring rule is not part of the sums, so one set of statistics serves every policy
kind: :func:`recast` turns the LinUCB carrier into any registered policy class.

What the default policy (``select``, :mod:`bandit.select`) needs beyond the sums is
each arm's prequential (predict-then-update) squared error of every candidate model:
which of the arm's nested models has predicted its quality best so far. The carrier
scores the same candidates as the deciders' ``select`` (:func:`carrier_settings`): each
event is predicted by every candidate fitted on the partition's statistics before it,
event by event within a batch (:func:`bandit.stats.sequential_errors`, exact in any
batching), and the errors are sums stored with the others, so a redelivered event that
is skipped adds none and the deciders add the partitions' errors as they add the sums.
A partition predicts from its own share of the events only: see docs/streams.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from bandit import LinUCB, Policy
from bandit.errors import InvalidInputError
from bandit.select import SelectiveThompsonConfig

__all__ = ["SHARED_KEY", "StatisticsMismatchError", "HalfLifeMismatchError",
           "DimensionMismatchError", "FeaturizerMismatchError", "as_carrier",
           "candidate_settings", "carrier_settings", "check_dim", "check_featurizer",
           "check_half_life", "check_stored", "load_statistics", "new_statistics", "recast",
           "sum_statistics", "scope_key", "sums_only"]

#: The settings that make a policy's model-selection candidates.
_CANDIDATES = ("context_ridge", "context_ridges", "tag_dims", "tag_ridge", "tag_ridges")

SHARED_KEY = "shared"


class StatisticsMismatchError(InvalidInputError):
    """Stored statistics do not fit this process's settings (they cannot be converted)."""


class HalfLifeMismatchError(StatisticsMismatchError):
    """Stored statistics were learned with another half-life than this process's."""


def scope_key(scope: str, tenant_id: str) -> str | None:
    """The extra statistics key a decision's feedback also feeds (None: shared only)."""
    return f"tenant:{tenant_id}" if scope == "isolated" else None


def carrier_settings(tag_dims: int = 0) -> dict[str, object]:
    """The candidate models the carriers score: those of the deciders' ``select``
    (:class:`~bandit.select.SelectiveThompsonConfig`'s defaults for this tag block).

    >>> carrier_settings()["context_ridges"]
    (1000000.0, 100.0)
    """
    return candidate_settings(SelectiveThompsonConfig(dim=tag_dims + 1, tag_dims=tag_dims))


def candidate_settings(config: object) -> dict[str, object]:
    """A policy configuration's model-selection settings (as keyword arguments)."""
    return {name: getattr(config, name) for name in _CANDIDATES}


# Carriers never decide: "arm", which every version reads (the previous one rejects
# "added-on-tags", so its learners and deciders could not read a rolling upgrade's sums).
_CARRIER_COLD = "arm"


def new_statistics(dim: int, half_life_hours: float | None = None,
                   tag_dims: int = 0) -> Policy:
    """An empty statistics carrier: no arms yet, no drift detector.

    With ``half_life_hours`` the sums forget by event time (``update_batch(...,
    times=...)``); ``decay_interval_s=0`` keeps the reference time at the latest event,
    so every stored weight is at most 1. It scores the candidates of ``select``
    (:func:`carrier_settings`; ``tag_dims``: the contexts' tag block) event by event.

    >>> new_statistics(4).arms
    []
    """
    return _exact(LinUCB(dim, drift_delta=None, half_life_hours=half_life_hours,
                         decay_interval_s=0.0, seed=0, cold_start_by=_CARRIER_COLD,
                         **carrier_settings(tag_dims)))


def _exact(policy: Policy) -> Policy:
    # Private, by design: the carrier's batches score like one update per event.
    policy._stats.exact_prequential = True  # noqa: SLF001
    return policy


def sums_only(policy: Policy) -> Policy:
    """``policy`` set to keep its sums only (``ArmStatistics.sums_only``): a learner's
    partition statistics are added to and stored (``to_bytes(derived=False)``), never
    predicted from, so their inverses are not recomputed after every batch. The
    readers restore them with :meth:`bandit.Policy.from_bytes`, which recomputes them
    from the sums."""
    policy._stats.sums_only = True  # noqa: SLF001
    return policy


def _same_candidates(a: Policy, b: Policy) -> bool:
    da, db = a._stats.sel_diag, b._stats.sel_diag  # noqa: SLF001
    return da.shape == db.shape and bool(np.array_equal(da, db))


def as_carrier(stats: Policy, tag_dims: int = 0) -> Policy:
    """``stats`` as a carrier of this process's candidates (:func:`new_statistics`).

    Statistics stored before the carriers scored candidates (or with other ones) keep
    their sums; their prequential errors start at zero, as a fresh ``select`` restored
    from a sibling kind's sums does.
    """
    settings = carrier_settings(tag_dims)
    if (candidate_settings(stats.config) == settings and isinstance(stats, LinUCB)
            and stats.config.cold_start_by == _CARRIER_COLD):
        return _exact(stats)
    return _exact(recast(stats, LinUCB, cold_start_by=_CARRIER_COLD, **settings))


def load_statistics(data: bytes, dim: int, half_life_hours: float | None, where: str,
                    tag_dims: int = 0) -> Policy:
    """Stored partition statistics, checked (:func:`check_stored`), as a carrier."""
    stats = check_stored(Policy.from_bytes(data), dim, half_life_hours, where)
    return as_carrier(stats, tag_dims)


def check_half_life(stats: Policy, half_life_hours: float | None, where: str) -> Policy:
    """Refuse statistics learned with another half-life (sums cannot be converted).

    >>> try:
    ...     check_half_life(new_statistics(2, 24.0), 168.0, "partition 0")
    ... except HalfLifeMismatchError as exc:
    ...     print(exc.field, "/", str(exc).split(": ", 1)[1][:40])
    half_life_hours / is 168.0 here, but the stored statistics
    """
    stored = stats.config.half_life_hours
    if stored != half_life_hours:
        raise HalfLifeMismatchError(
            "half_life_hours",
            f"is {half_life_hours} here, but the stored statistics of {where} were "
            f"learned with {stored}: set BANDIT_ROUTER_HALF_LIFE_HOURS (learner: "
            "--half-life-hours) to the same value on every learner and API replica, or "
            "start a fresh consumer group (BANDIT_ROUTER_LEARNER_GROUP) to learn with "
            "the new one")
    return stats


class DimensionMismatchError(StatisticsMismatchError):
    """Stored statistics have another context dimension than this process's."""


def check_dim(stats: Policy, dim: int, where: str) -> Policy:
    """Refuse statistics of another context dimension (another featurizer setting).

    >>> try:
    ...     check_dim(new_statistics(2), 3, "partition 0")
    ... except DimensionMismatchError as exc:
    ...     print(exc.field, "/", str(exc).split(": ", 1)[1][:51])
    dim / is 3 here, but the stored statistics of partition 0
    """
    if stats.dim != dim:
        raise DimensionMismatchError(
            "dim", f"is {dim} here, but the stored statistics of {where} have "
            f"{stats.dim} dimensions: set BANDIT_ROUTER_DIM and BANDIT_ROUTER_PROTOTYPE_MAP "
            "(the policies' dimension is the map's dim when it is set) to the same values "
            "on every learner and API replica, or start a fresh consumer group "
            "(BANDIT_ROUTER_LEARNER_GROUP) to learn with the new ones")
    return stats


class FeaturizerMismatchError(StatisticsMismatchError):
    """Stored statistics were learned from contexts of another featurizer."""


def check_featurizer(stored: str | None, featurizer: str | None, where: str) -> None:
    """Refuse statistics whose contexts another featurizer made (the same dimension
    does not make the same vectors: hashing versions 1 and 2 differ everywhere).

    ``None`` on either side is not checked: statistics written before the spec was
    recorded, or a process that does not know its featurizer (tests, benchmarks).

    >>> try:
    ...     check_featurizer("hashing-v2:dim=8", "hashing-v1:dim=8", "partition 0")
    ... except FeaturizerMismatchError as exc:
    ...     print(exc.field, "/", str(exc).split(": ", 1)[1][:40])
    featurizer / is 'hashing-v1:dim=8' here, but the stor
    """
    if stored is not None and featurizer is not None and stored != featurizer:
        raise FeaturizerMismatchError(
            "featurizer",
            f"is {featurizer!r} here, but the stored statistics of {where} were learned "
            f"from contexts of {stored!r}: set BANDIT_ROUTER_FEATURIZER, "
            "BANDIT_ROUTER_FEATURIZER_SEED, BANDIT_ROUTER_HASHING_VERSION, BANDIT_ROUTER_DIM "
            "and BANDIT_ROUTER_PROTOTYPE_MAP to the same values on every learner and API "
            "replica, or start a fresh consumer group (BANDIT_ROUTER_LEARNER_GROUP) to "
            "learn with the new ones")


def check_stored(stats: Policy, dim: int, half_life_hours: float | None,
                 where: str) -> Policy:
    """Both checks a process makes on statistics it loads (:func:`check_half_life`,
    :func:`check_dim`); raises a :class:`StatisticsMismatchError`."""
    return check_dim(check_half_life(stats, half_life_hours, where), dim, where)


def recast(stats: Policy, cls: type[Policy], **config: object) -> Policy:
    """The same data sums and arms as ``stats``, as a ``cls`` policy with ``config``.

    The model-selection candidates are ``cls``'s defaults unless ``config`` names them;
    the prequential errors are kept only when the candidates are the same.

    Goes through the public serialization (``Policy.from_bytes(..., as_class=cls)``):
    the sums are class-independent.

    >>> import numpy as np
    >>> from bandit import LinearThompson
    >>> s = new_statistics(2); s.add_arm("a"); s.update("a", [1.0, 0.0], {"quality": 1.0})
    >>> t = recast(s, LinearThompson)
    >>> type(t).__name__, t.observations("a")["quality"]
    ('LinearThompson', 1)
    """
    # The class's own candidates unless given (the contexts' layout, tag_dims, stays).
    own = candidate_settings(cls.Config(dim=stats.dim, tag_dims=stats.config.tag_dims))
    out = Policy.from_bytes(stats.to_bytes(derived=False), as_class=cls,
                            **{**own, **config})
    if out._stats.selecting and not _same_candidates(out, stats):  # noqa: SLF001
        # Errors of other candidates say nothing about these: they start afresh.
        out._stats.sel_err[:] = 0.0  # noqa: SLF001
        out._stats.refresh()  # noqa: SLF001
    return out


def sum_statistics(parts: Iterable[Policy], dim: int, half_life_hours: float | None = None,
                   now: float | None = None, tag_dims: int = 0) -> Policy:
    """The sum of several partitions' statistics (one carrier, :func:`as_carrier`):
    data sums and the candidates' prequential errors alike.

    With forgetting, every partition is decayed to the latest reference time among them
    (:meth:`bandit.Policy.merge`), then the sum to ``now`` if that is later: a stream
    that went idle keeps forgetting. The result's reference time is
    ``max(now, latest partition reference)``, the same whichever order ``parts`` come in.
    """
    total = new_statistics(dim, half_life_hours, tag_dims)
    for part in parts:
        total.merge(as_carrier(part, tag_dims))
    if now is not None:
        total.decay(now)
    return total
