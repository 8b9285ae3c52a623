"""Guarded exploration: never fall much below the model a tenant would call without us.

A conservative contextual bandit (Kazerouni et al., "Conservative Contextual Linear
Bandits", NeurIPS 2017): the router plays its policy's choice only while a lower
confidence bound of its cumulative reward stays within a fraction ``max_loss`` of the
baseline's; otherwise it plays the baseline. With ``S`` the rounds where a non-baseline
arm was played and ``B`` the baseline's cumulative reward over every guarded round, the
choice ``a`` (not the baseline ``b``) at round ``t`` is allowed when

    margin + (u_a - z s_a - u_b) - z (unc + s_b) - z sigma sqrt(|S| + 1)
        >= -max_loss * max(B + u_b, 0)

where, for the rounds in ``S``, ``margin`` sums (own reward - u_b): the realized reward
once feedback arrived, the lower bound ``u_a - z s_a`` before; ``unc`` sums the baseline's
prediction std ``s_b`` (its estimate is shared by every round, so the stds add up, they
do not average out); ``sigma`` is the noise of one reward around its prediction (learned
from every feedback the guard sees), so ``z sigma sqrt(|S| + 1)`` covers the realized
rewards the baseline would have had on the rounds it was not played. ``u`` and ``s`` are
the policy's predicted utility and its std at decision time (any :class:`~bandit.Policy`
gives both). ``B`` counts the baseline's predicted reward, replaced by the realized one
where the baseline was played and feedback arrived.

The guard also keeps a doubly robust estimate of the router's value against the
baseline: per round with feedback, ``r - (u_b + 1[a = b] / p (r - u_b))``, with ``p`` the
logged propensity of the chosen arm. It is exactly 0 on rounds where the baseline was
played with propensity 1.

The state is a handful of sums (:class:`GuardState`, JSON round trip); each decision's
part of it is a :class:`GuardRecord`, so an outcome that arrives later (or again, with
more fields) replaces that decision's part exactly, and sums kept apart (replicas) add.

Examples
--------
>>> from bandit import LinUCB, Preferences
>>> policy = LinUCB(dim=1, seed=0)
>>> for arm in ("cheap", "strong"):
...     policy.add_arm(arm)
>>> guard = ConservativeGuard(GuardConfig(baseline="strong", max_loss=0.02))
>>> state = GuardState()
>>> choice = guard.decide(policy, [1.0], state)
>>> choice.arm, choice.overridden  # nothing earned yet: no room to explore
('strong', True)
>>> guard.observe(state, choice.record, reward=0.9)
>>> state.rounds, round(state.baseline_total, 3)
(1, 0.9)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

import numpy as np

from bandit.base import Policy, Preferences, check_finite_number
from bandit.errors import InvalidInputError, UnknownArmError

__all__ = ["MAX_LOSS_RANGE", "GuardConfig", "GuardRecord", "GuardState", "GuardedChoice",
           "ConservativeGuard", "merge_outcome"]

#: Allowed range of ``max_loss`` (a fraction of the baseline's cumulative reward).
MAX_LOSS_RANGE = (0.0, 1.0)


class GuardConfig(NamedTuple):
    """Settings of a :class:`ConservativeGuard` (immutable; :meth:`validated` once).

    Parameters
    ----------
    baseline
        The arm the tenant would call without a router.
    max_loss
        How far the router's cumulative reward may fall below the baseline's, as a
        fraction of the baseline's cumulative reward, in [0, 1]. 0 explores only once
        the router is already ahead by its own lower bound.
    z
        Width of every confidence bound, in standard deviations. 2 (about 98% one-sided
        per bound) kept the realized gap above the bound on every shuffle of the
        llmrouter replay (benchmarks/guarded_exploration.py); 1 did not.
    noise_prior
        Variance of one reward around its prediction before any feedback (0.25: a
        quality in [0, 1] has at most that), worth ``noise_prior_weight`` observations.
    noise_prior_weight
        How many observations ``noise_prior`` is worth.
    """

    baseline: str
    max_loss: float = 0.02
    z: float = 2.0
    noise_prior: float = 0.25
    noise_prior_weight: float = 10.0

    def validated(self) -> GuardConfig:
        if not isinstance(self.baseline, str) or not self.baseline:
            raise InvalidInputError("baseline_model", "must be the name of a model",
                                    self.baseline)
        check_finite_number("max_exploration_loss", self.max_loss, low=MAX_LOSS_RANGE[0],
                            high=MAX_LOSS_RANGE[1])
        check_finite_number("z", self.z, low=0.0, high=10.0)
        check_finite_number("noise_prior", self.noise_prior, low=0.0)
        check_finite_number("noise_prior_weight", self.noise_prior_weight, low=0.0)
        return self


class GuardRecord(NamedTuple):
    """One guarded decision: what its outcome needs to update the state later.

    ``lower`` is the played arm's lower bound ``u_a - z s_a`` (equal to ``u_b`` when the
    baseline was played); ``predicted`` its predicted utility ``u_a``.
    """

    baseline: str
    played_baseline: bool
    baseline_utility: float
    baseline_std: float
    predicted: float
    lower: float
    propensity: float

    def to_list(self) -> list[object]:
        return list(self)

    @classmethod
    def from_list(cls, values: Sequence[object]) -> GuardRecord:
        if len(values) != len(cls._fields):
            raise InvalidInputError("guard record", f"must have {len(cls._fields)} values",
                                    len(values))
        return cls(str(values[0]), bool(values[1]), *(float(v) for v in values[2:]))


@dataclass
class GuardState:
    """The guard's sums for one tenant (mutable; JSON round trip with :meth:`to_dict`).

    Attributes
    ----------
    rounds
        Guarded decisions (the baseline among the candidates).
    baseline_total
        ``B``: the baseline's cumulative reward (predicted; realized where played).
    margin
        Sum over non-baseline plays of (own reward or its lower bound) - ``u_b``.
    uncertainty
        Sum over non-baseline plays of the baseline's prediction std.
    plays
        Non-baseline plays, ``|S|``.
    residuals, residual_sq
        Outcomes seen and the sum of their squared residuals (noise estimate).
    value, value_rounds
        Doubly robust estimate of the cumulative reward of the router minus the
        baseline's, over the rounds with feedback, and how many those are.
    """

    rounds: int = 0
    baseline_total: float = 0.0
    margin: float = 0.0
    uncertainty: float = 0.0
    plays: int = 0
    residuals: int = 0
    residual_sq: float = 0.0
    value: float = 0.0
    value_rounds: int = 0

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> GuardState:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InvalidInputError(unknown[0], "is not a guard state field; allowed: "
                                    + ", ".join(sorted(names)))
        state = cls()
        for f in fields(cls):
            if f.name in data:
                raw = data[f.name]
                setattr(state, f.name, int(raw) if f.type == "int" else float(raw))  # type: ignore[arg-type]
        return state

    def add(self, other: GuardState) -> GuardState:
        """Add another state's sums (another replica's) in place; returns self."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


class GuardedChoice(NamedTuple):
    """The arm to play, its propensity under policy + guard, and what to record."""

    arm: str
    propensity: float
    overridden: bool
    record: GuardRecord


class ConservativeGuard:
    """Wraps a policy's decisions so that exploration never costs more than the bound.

    Stateless itself (a validated config): the per-tenant :class:`GuardState` is passed
    in, so one guard serves any number of tenants and the state lives where the caller
    keeps it (memory, a database, a checkpoint).
    """

    def __init__(self, config: GuardConfig) -> None:
        self.config = config.validated()

    # ------------------------------------------------------------- the bound
    def noise_std(self, state: GuardState) -> float:
        """Standard deviation of one reward around its prediction (prior + residuals)."""
        c = self.config
        weight = c.noise_prior_weight + state.residuals
        if weight <= 0:
            return 0.0
        return math.sqrt((c.noise_prior * c.noise_prior_weight + state.residual_sq) / weight)

    def lower_gap(self, state: GuardState, utility: float, std: float,
                  baseline_utility: float, baseline_std: float) -> float:
        """Lower bound of (router - baseline) cumulative reward if an arm with this
        predicted ``utility`` and ``std`` is played now instead of the baseline."""
        z = self.config.z
        return (state.margin + (utility - z * std - baseline_utility)
                - z * (state.uncertainty + baseline_std)
                - z * self.noise_std(state) * math.sqrt(state.plays + 1))

    def allowance(self, state: GuardState, baseline_utility: float) -> float:
        """How far below the baseline the router may be after this round (>= 0)."""
        return self.config.max_loss * max(state.baseline_total + baseline_utility, 0.0)

    def allows(self, state: GuardState, utility: float, std: float,
               baseline_utility: float, baseline_std: float) -> bool:
        """Whether an arm with this prediction may be played instead of the baseline."""
        return (self.lower_gap(state, utility, std, baseline_utility, baseline_std)
                >= -self.allowance(state, baseline_utility))

    # -------------------------------------------------------------- deciding
    def choose(self, state: GuardState, arm: str, propensity: float,
               utility: Mapping[str, float], std: Mapping[str, float],
               probabilities: Mapping[str, float] | Callable[[], Mapping[str, float]]
               | None = None, *, count: bool = True) -> GuardedChoice:
        """Guard one decision the policy made and count it in ``state``.

        ``utility`` and ``std`` hold the policy's predicted utility and its std of every
        candidate (the baseline must be one). ``probabilities`` (every candidate's
        probability under the policy) is needed only to log the exact propensity of an
        overridden choice: the baseline is then played whenever the policy picks the
        baseline or an arm the guard refuses. It may be a function returning them, called
        only for an override. Without it the propensity logged for an override is 1
        (what it is when the policy is deterministic).

        ``count=False`` leaves ``state`` alone: the caller counts the record with
        :meth:`count` once the decision stands (a budget may still change it).
        """
        b = self.config.baseline
        if b not in utility or b not in std:
            raise UnknownArmError("baseline_model", "must be one of the candidates; got "
                                  + ", ".join(utility), b)
        ub, sb = float(utility[b]), float(std[b])
        if arm != b and self.allows(state, float(utility[arm]), float(std[arm]), ub, sb):
            record = GuardRecord(b, False, ub, sb, float(utility[arm]),
                                 float(utility[arm]) - self.config.z * float(std[arm]),
                                 float(propensity))
            overridden = False
        else:
            overridden = arm != b
            if overridden:
                if callable(probabilities):
                    probabilities = probabilities()
                if probabilities is None:
                    propensity = 1.0
                else:
                    propensity = float(probabilities.get(b, 0.0)) + sum(
                        float(p) for a, p in probabilities.items() if a != b and not
                        self.allows(state, float(utility[a]), float(std[a]), ub, sb))
            arm = b
            record = GuardRecord(b, True, ub, sb, ub, ub, float(propensity))
        if count:
            self.count(state, record)
        return GuardedChoice(arm, float(propensity), overridden, record)

    def decide(self, policy: Policy, x: object, state: GuardState,
               preferences: Preferences | None = None,
               candidates: Sequence[str] | None = None) -> GuardedChoice:
        """``policy.decide`` guarded: one context, the policy's choice or the baseline."""
        decision = policy.decide(x, preferences, candidates)
        utility = {a: p.utility for a, p in decision.predictions.items()}
        std = {a: p.uncertainty for a, p in decision.predictions.items()}
        probabilities = None
        if decision.arm != self.config.baseline and self.config.baseline in utility and \
                not self.allows(state, utility[decision.arm], std[decision.arm],
                                utility[self.config.baseline], std[self.config.baseline]):
            names, probs = policy.probabilities(x, preferences, list(utility))
            probabilities = dict(zip(names, np.asarray(probs)[0].tolist(), strict=True))
        return self.choose(state, decision.arm, decision.propensity, utility, std,
                           probabilities)

    # -------------------------------------------------------------- counting
    @staticmethod
    def count(state: GuardState, record: GuardRecord, sign: int = 1) -> None:
        """Add a decision (no outcome yet) to ``state``; ``sign=-1`` takes it back (a
        decision that was never answered)."""
        state.rounds += sign
        state.baseline_total += sign * record.baseline_utility
        if not record.played_baseline:
            state.plays += sign
            state.margin += sign * (record.lower - record.baseline_utility)
            state.uncertainty += sign * record.baseline_std

    @staticmethod
    def contribution(record: GuardRecord, reward: float | None) -> tuple[float, float,
                                                                         float | None,
                                                                         float | None]:
        """A decision's part of (baseline_total, margin, residual^2, value), given its
        realized ``reward`` (None: no outcome yet)."""
        ub = record.baseline_utility
        if reward is None:
            return (ub, 0.0 if record.played_baseline else record.lower - ub, None, None)
        r = float(reward)
        residual_sq = (r - record.predicted) ** 2
        if record.played_baseline:
            p = max(record.propensity, 1e-12)
            value = r - (ub + (r - ub) / p)
            return r, 0.0, residual_sq, value
        return ub, r - ub, residual_sq, r - ub

    def observe(self, state: GuardState, record: GuardRecord, reward: float,
                previous: float | None = None) -> None:
        """Learn a decision's realized reward (in the tenant's reward units).

        ``previous`` is the reward this decision was observed with before, if any (a
        second feedback event with more fields): its part is replaced, not added twice.
        """
        reward = check_finite_number("reward", reward)
        old = self.contribution(record, previous)
        new = self.contribution(record, reward)
        state.baseline_total += new[0] - old[0]
        state.margin += new[1] - old[1]
        if old[2] is not None:
            state.residuals -= 1
            state.residual_sq -= old[2]
            state.value_rounds -= 1
            state.value -= old[3]  # type: ignore[operator]
        state.residuals += 1
        state.residual_sq += new[2]  # type: ignore[operator]
        state.value_rounds += 1
        state.value += new[3]  # type: ignore[operator]


def merge_outcome(stored: Mapping[str, object], outcome: Mapping[str, float | None],
                  predicted: Mapping[str, float | None],
                  preferences: Preferences) -> dict[str, object]:
    """A decision's stored guard part (``{"record", "outcome", "reward"}``) after one more
    feedback ``outcome``: the outcomes merged (a later value of a field wins), the reward
    of the merged outcome under ``preferences``, with the fields no feedback has reported
    taken as ``predicted``. The embedded ingest and the Kafka learners both store this.

    >>> merge_outcome({"record": [], "outcome": {"quality": 0.5}}, {"cost_usd": 0.01},
    ...               {"latency_ms": 900.0}, Preferences(1.0, 10.0, 0.0))
    {'record': [], 'outcome': {'quality': 0.5, 'cost_usd': 0.01}, 'reward': 0.4}
    """
    before = stored.get("outcome") or {}
    merged = {**before, **{k: v for k, v in outcome.items()  # type: ignore[dict-item]
                           if v is not None}}
    values = {key: merged.get(key, predicted.get(key)) or 0.0
              for key in ("quality", "cost_usd", "latency_ms")}
    return {"record": stored["record"], "outcome": merged,
            "reward": preferences.reward(**values)}
