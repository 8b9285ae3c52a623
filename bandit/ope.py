"""Off-policy evaluation: the value of a candidate policy, from decisions another policy
logged with their propensities.

Three estimators of the mean reward a candidate would get:

* IPS: ``mean(w_i r_i)`` with ``w_i = pi(a_i | x_i) / p_i``; unbiased when every logged
  propensity ``p_i`` is right and positive wherever the candidate acts.
* SNIPS (self-normalized): ``sum(w_i r_i) / sum(w_i)``; slightly biased, much lower
  variance when weights are large.
* Doubly robust: ``mean(sum_a pi(a|x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)))`` with the
  candidate's own reward predictions ``q``; unbiased if either the propensities or the
  predictions are right, and lower variance than IPS when the predictions are good.

Each returns an :class:`Estimate` with a standard error and a normal 95% interval.

:func:`evaluate_log` evaluates a *learning* candidate: it walks the log in order; at each
row the candidate's current distribution is scored against the logged choice, then the
candidate learns from the logged outcome, as it would have in production had it been
trained on that traffic. Each term depends only on earlier rows, so the estimators stay
unbiased for the average value of the candidate's successive states.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from bandit.base import Policy, Preferences, parse_outcome
from bandit.errors import InvalidInputError

__all__ = ["Estimate", "ips", "snips", "doubly_robust", "evaluate_log", "LoggedDecisions"]

_Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    """A value estimate with its standard error and a normal 95% interval."""

    value: float
    stderr: float
    n: int

    @property
    def low(self) -> float:
        return self.value - _Z95 * self.stderr

    @property
    def high(self) -> float:
        return self.value + _Z95 * self.stderr

    def covers(self, truth: float) -> bool:
        return self.low <= truth <= self.high

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "stderr": self.stderr, "low": self.low,
                "high": self.high, "n": self.n}


def _check(weights_num: np.ndarray, logged_p: np.ndarray, rewards: np.ndarray) -> None:
    n = len(rewards)
    if len(weights_num) != n or len(logged_p) != n:
        raise InvalidInputError("rewards", "target probabilities, propensities and rewards "
                                "must have the same length", (len(weights_num), len(logged_p), n))
    if n == 0:
        raise InvalidInputError("rewards", "need at least one logged decision", 0)
    if not (np.all(np.isfinite(logged_p)) and np.all(logged_p > 0) and np.all(logged_p <= 1)):
        raise InvalidInputError("propensity", "every logged propensity must be in (0, 1]")
    if not np.all(np.isfinite(rewards)):
        raise InvalidInputError("rewards", "must be finite")


def _mean_estimate(terms: np.ndarray) -> Estimate:
    n = len(terms)
    stderr = float(terms.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return Estimate(float(terms.mean()), stderr, n)


def _weights(target_p: np.ndarray, logged_p: np.ndarray, clip: float | None) -> np.ndarray:
    w = np.asarray(target_p, dtype=float) / np.asarray(logged_p, dtype=float)
    return w if clip is None else np.minimum(w, clip)


def ips(target_p: Sequence[float], logged_p: Sequence[float], rewards: Sequence[float], *,
        clip: float | None = None) -> Estimate:
    """Inverse propensity scoring.

    ``target_p[i]`` is the candidate's probability of the logged action ``a_i``;
    ``clip`` caps the weights (biased, lower variance).

    >>> ips([1.0, 0.0], [0.5, 0.5], [1.0, 0.0]).value
    1.0
    """
    t, p, r = (np.asarray(v, dtype=float) for v in (target_p, logged_p, rewards))
    _check(t, p, r)
    return _mean_estimate(_weights(t, p, clip) * r)


def snips(target_p: Sequence[float], logged_p: Sequence[float],
          rewards: Sequence[float]) -> Estimate:
    """Self-normalized IPS, with a delta-method standard error.

    >>> round(snips([1.0, 1.0, 0.0], [0.5, 0.5, 0.5], [1.0, 0.0, 1.0]).value, 3)
    0.5
    """
    t, p, r = (np.asarray(v, dtype=float) for v in (target_p, logged_p, rewards))
    _check(t, p, r)
    w = _weights(t, p, None)
    total = w.sum()
    if total <= 0:
        return Estimate(math.nan, math.inf, len(r))
    value = float((w * r).sum() / total)
    stderr = float(math.sqrt(((w * (r - value)) ** 2).sum()) / total)
    return Estimate(value, stderr, len(r))


def doubly_robust(target_probs: np.ndarray, chosen: Sequence[int], logged_p: Sequence[float],
                  rewards: Sequence[float], predicted: np.ndarray, *,
                  clip: float | None = None) -> Estimate:
    """Doubly robust estimate.

    ``target_probs`` (n, K): the candidate's distribution over the K actions;
    ``chosen`` (n,): index of the logged action; ``predicted`` (n, K): the candidate's
    reward prediction for every action.
    """
    probs = np.asarray(target_probs, dtype=float)
    q = np.asarray(predicted, dtype=float)
    ch = np.asarray(chosen, dtype=np.intp)
    p, r = np.asarray(logged_p, dtype=float), np.asarray(rewards, dtype=float)
    rows = np.arange(len(ch))
    _check(probs[rows, ch], p, r)
    w = _weights(probs[rows, ch], p, clip)
    terms = (probs * q).sum(axis=1) + w * (r - q[rows, ch])
    return _mean_estimate(terms)


@dataclass(frozen=True)
class LoggedDecisions:
    """Decisions logged by a policy in production (or a replay).

    Attributes
    ----------
    contexts
        (n, dim) context vectors.
    arms
        The logged (chosen) arm names.
    propensities
        The logging policy's probability of each logged choice.
    outcomes
        What was observed for each choice (``quality``, ``cost_usd``, ``latency_ms``).
    candidates
        Arm names that were allowed for each decision (None: every arm of the log).
    """

    contexts: np.ndarray
    arms: Sequence[str]
    propensities: Sequence[float]
    outcomes: Sequence[Mapping[str, object]]
    candidates: Sequence[Sequence[str]] | None = None

    def rewards(self, preferences: Preferences) -> np.ndarray:
        """Reward of each logged outcome; NaN where an objective the preferences weigh is
        missing (such rows cannot be scored and are left out)."""
        w = preferences.head_weights()
        heads = np.stack([parse_outcome(o) for o in self.outcomes])
        weighted = np.where(w != 0, heads * w, 0.0)  # NaN survives where w != 0
        return weighted.sum(axis=1)


def evaluate_log(candidate: Policy, log: LoggedDecisions, preferences: Preferences, *,
                 learn: bool = True, batch_size: int = 1, clip: float | None = None,
                 seconds_per_row: float = 1.0,
                 on_row: Callable[[int, list[str], np.ndarray], object] | None = None,
                 ) -> dict[str, object]:
    """Estimate the mean reward ``candidate`` would have got on the logged traffic.

    Parameters
    ----------
    candidate
        The policy to evaluate (any configuration, preferences or class). With
        ``learn=True`` it learns from each logged outcome after scoring that row, so a
        fresh policy is evaluated as it would have learned; with ``learn=False`` it is
        evaluated frozen in its current state.
    batch_size
        Rows scored with the same state before learning from them (speed; 1 is exact
        sequential evaluation).
    clip
        Cap on the importance weights (None: no cap).
    on_row
        Called with (row index, candidate names, the candidate's distribution) for each
        scored row: where the truth is known (a replay log), it gives the exact value.

    Returns
    -------
    dict with ``ips``, ``snips``, ``dr`` (:class:`Estimate`), ``rows`` used and
    ``skipped`` (rows whose reward could not be computed or whose logged arm the
    candidate does not know).
    """
    x = np.asarray(log.contexts, dtype=float)
    n = x.shape[0]
    if not (len(log.arms) == len(log.propensities) == len(log.outcomes) == n):
        raise InvalidInputError("log", "contexts, arms, propensities and outcomes must have "
                                "the same length")
    rewards = log.rewards(preferences)
    known = set(candidate.arms)
    usable = np.array([not math.isnan(r) and a in known
                       for r, a in zip(rewards.tolist(), log.arms, strict=True)])
    target, predicted_chosen, dr_terms = [], [], []
    t_used, p_used, r_used = [], [], []
    for start in range(0, n, batch_size):
        rows = [i for i in range(start, min(start + batch_size, n)) if usable[i]]
        groups: dict[tuple[str, ...] | None, list[int]] = {}
        for i in rows:
            cands = None if log.candidates is None else tuple(
                c for c in log.candidates[i] if c in known)
            groups.setdefault(cands, []).append(i)
        for cands, idx in groups.items():
            names, probs, q = candidate._distribution(x[idx], preferences, cands)
            col = {name: j for j, name in enumerate(names)}
            for row, i in enumerate(idx):
                if on_row is not None:
                    on_row(i, names, probs[row])
                j = col.get(log.arms[i])
                prob = 0.0 if j is None else float(probs[row, j])
                q_chosen = 0.0 if j is None else float(q[row, j])
                w = prob / float(log.propensities[i])
                if clip is not None:
                    w = min(w, clip)
                dr_terms.append(float(probs[row] @ q[row]) + w * (rewards[i] - q_chosen))
                target.append(prob)
                predicted_chosen.append(q_chosen)
                t_used.append(i)
                p_used.append(float(log.propensities[i]))
                r_used.append(float(rewards[i]))
        if learn:
            for i in range(start, min(start + batch_size, n)):
                if log.arms[i] in known:
                    candidate.update(log.arms[i], x[i], log.outcomes[i],
                                     now=i * seconds_per_row)
    if not t_used:
        raise InvalidInputError("log", "no row could be scored (unknown arms or missing "
                                "outcomes for the weighted objectives)")
    return {
        "ips": ips(target, p_used, r_used, clip=clip),
        "snips": snips(target, p_used, r_used),
        "dr": _mean_estimate(np.asarray(dr_terms)),
        "rows": len(t_used),
        "skipped": int(n - len(t_used)),
    }
