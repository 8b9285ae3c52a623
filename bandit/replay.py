"""Offline replay of a log with every model's outcome, under bandit feedback.

The log holds, for each query, the outcome every model would have had; the policy sees
only the outcome of the model it chose, as it would in production. Because the log has
every model's outcome, the regret against the per-query oracle of the same reward is
exact, and so is every single model's score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bandit.base import ArmPrior, Policy, Preferences
from bandit.errors import InvalidInputError

__all__ = ["ReplayLog", "ReplayRun", "replay", "summarize", "cumulative_regret",
           "warm_start", "routing_value"]


@dataclass(frozen=True)
class ReplayLog:
    """Contexts and every arm's outcome.

    Attributes
    ----------
    arms
        Model names, the columns of ``outcomes``.
    outcomes
        (n, K, 3) array: quality in [0, 1], cost in USD, latency in ms; NaN = unknown
        (a missing latency counts as 0 in the reward; quality and cost are required).
    """

    arms: list[str]
    outcomes: np.ndarray

    def __post_init__(self) -> None:
        out = self.outcomes
        if out.ndim != 3 or out.shape[1] != len(self.arms) or out.shape[2] != 3:
            raise InvalidInputError("outcomes", "must have shape (n, K, 3) with K = len(arms)",
                                    out.shape)
        missing = np.isnan(out[:, :, :2])
        if missing.any():
            row, arm, head = np.argwhere(missing)[0]
            name = ("quality", "cost_usd")[head]
            raise InvalidInputError(f"outcomes[{row}].{self.arms[arm]}.{name}",
                                    "every model needs quality and cost_usd on every row")

    def rewards(self, preferences: Preferences) -> np.ndarray:
        """(n, K) reward of every arm on every row."""
        q, c, lat = self.outcomes[:, :, 0], self.outcomes[:, :, 1], self.outcomes[:, :, 2]
        return (preferences.quality * q - preferences.cost * c
                - preferences.latency * np.nan_to_num(lat) / 1e3)


@dataclass(frozen=True)
class ReplayRun:
    """What one pass produced: the choice and its propensity per row, and the summary."""

    choices: np.ndarray
    propensities: np.ndarray
    summary: dict


def replay(policy: Policy, x: np.ndarray, log: ReplayLog, preferences: Preferences, *,
           batch_size: int = 1, seconds_per_row: float = 1.0,
           prior_cost_from_log: bool = True, propensities: bool = False,
           progress: Callable[[int], object] | None = None,
           cost_estimates: np.ndarray | None = None, baseline: str | None = None,
           groups: Sequence[object] | None = None) -> ReplayRun:
    """One online pass of ``policy`` over the log.

    Parameters
    ----------
    policy
        A fresh policy; the log's arms are added to it if it does not have them yet.
    x
        (n, dim) contexts.
    batch_size
        Rows decided with the same state before their feedback is applied (feedback
        delay, as in production where feedback arrives after later decisions).
    seconds_per_row
        Simulated time between rows (drives forgetting, if the policy has it).
    prior_cost_from_log
        Declare each arm's mean cost in the log as its prior cost (a router knows the
        price list); quality stays unknown.
    propensities
        Compute each decision's propensity (costs a quadrature per row for Thompson).
    progress
        Optional callable(rows_done) for progress bars.
    cost_estimates
        (n, K) USD each model's request was expected to cost before the call (declared
        prices x tokens), passed to every decision and update as the policy's
        ``cost_estimate``; None: the policy learns costs from feedback alone.
    baseline, groups
        Passed to :func:`summarize` (value against a named model; task labels).
    """
    n = log.outcomes.shape[0]
    if x.shape[0] != n:
        raise InvalidInputError("x", f"must have one row per log row ({n})", x.shape)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError("batch_size", "must be an integer >= 1", batch_size)
    if cost_estimates is not None and np.shape(cost_estimates) != (n, len(log.arms)):
        raise InvalidInputError("cost_estimates", f"must have shape ({n}, {len(log.arms)})",
                                np.shape(cost_estimates))
    for j, name in enumerate(log.arms):
        if name not in policy.arms:
            prior = ArmPrior(cost_usd=float(log.outcomes[:, j, 1].mean())
                             if prior_cost_from_log else None)
            policy.add_arm(name, prior)
    choices = np.empty(n, dtype=np.intp)
    props = np.full(n, np.nan)
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        batch = policy.decide_batch(
            x[rows], preferences, log.arms, propensities=propensities,
            cost_estimate=None if cost_estimates is None else cost_estimates[rows])
        choices[rows] = batch.choices
        props[rows] = batch.propensities
        for t in range(rows.start, rows.stop):
            j = int(choices[t])
            q, c, lat = log.outcomes[t, j]
            outcome = {"quality": float(q), "cost_usd": float(c)}
            if not np.isnan(lat):
                outcome["latency_ms"] = float(lat)
            policy.update(log.arms[j], x[t], outcome, now=t * seconds_per_row,
                          cost_estimate=None if cost_estimates is None
                          else float(cost_estimates[t, j]))
        if progress is not None:
            progress(rows.stop)
    return ReplayRun(choices, props, summarize(log, preferences, choices, baseline=baseline,
                                               groups=groups))


def summarize(log: ReplayLog, preferences: Preferences, choices: np.ndarray,
              tail: float = 0.2, *, baseline: str | None = None,
              groups: Sequence[object] | None = None) -> dict:
    """Mean quality / cost / reward, regret and routing value (:func:`routing_value`) of a
    run, every single model and the oracle, over the whole stream and over its last
    ``tail`` share. ``baseline`` (a model name) and ``groups`` (a task label per row) add
    the value against that model and the task-level oracle's value."""
    n = len(choices)
    rewards = log.rewards(preferences)
    start = int(round(n * (1 - tail)))
    if baseline is not None and baseline not in log.arms:
        raise InvalidInputError("baseline", "unknown model; allowed: " + ", ".join(log.arms),
                                baseline)
    base = None if baseline is None else log.arms.index(baseline)
    labels = None if groups is None else np.asarray(groups)
    return {
        "rows": n,
        "preferences": preferences._asdict(),
        "all": _window(log, rewards, choices, slice(0, n), base, labels),
        f"last_{int(round(tail * 100))}pct": _window(log, rewards, choices,
                                                     slice(start, n), base, labels),
    }


def _window(log: ReplayLog, rewards: np.ndarray, choices: np.ndarray, rows: slice,
            baseline: int | None = None, groups: np.ndarray | None = None) -> dict:
    out = log.outcomes[rows]
    r = rewards[rows]
    ch = choices[rows]
    idx = np.arange(len(ch))
    oracle = np.argmax(r, axis=1)
    best = r[idx, oracle]

    def stats(pick: np.ndarray) -> dict:
        lat = out[idx, pick, 2]
        return {
            "quality": float(out[idx, pick, 0].mean()),
            "cost_usd": float(out[idx, pick, 1].mean()),
            "latency_ms": None if np.isnan(lat).all() else float(np.nanmean(lat)),
            "reward": float(r[idx, pick].mean()),
            "regret": float((best - r[idx, pick]).sum()),
        }

    models = {name: stats(np.full(len(ch), j)) for j, name in enumerate(log.arms)}
    share = np.bincount(ch, minlength=len(log.arms)) / max(len(ch), 1)
    value = routing_value(r, ch, baseline=baseline,
                          groups=None if groups is None else groups[rows])
    value["best_model"] = log.arms[value["best_model"]]
    return {
        "rows": int(len(ch)),
        "value": value,
        "policy": stats(ch),
        "oracle": stats(oracle),
        "random": {"reward": float(r.mean()), "quality": float(out[:, :, 0].mean()),
                   "cost_usd": float(out[:, :, 1].mean())},
        "models": models,
        "best_model": max(models, key=lambda m: models[m]["reward"]),
        "share": {name: float(share[j]) for j, name in enumerate(log.arms)},
    }


def routing_value(rewards: np.ndarray, choices: np.ndarray, *,
                  baseline: int | None = None,
                  groups: Sequence[object] | np.ndarray | None = None) -> dict:
    """How much of the room above the best fixed model a router earned.

    value = (R_router - R_fixed) / (R_oracle - R_fixed), with R the mean reward over the
    rows, R_fixed that of the best single model in hindsight over the same rows and
    R_oracle that of the per-query oracle: 0 = no better than always calling the best
    model, 1 = the oracle, negative = worse than the fixed choice. NaN when the oracle
    is no better than the best model (no headroom).

    Parameters
    ----------
    rewards
        (n, K) reward of every model on every row, at the tenant's weights.
    choices
        (n,) index of the model the router chose on each row.
    baseline
        Index of the model the user calls today: adds ``baseline_value``, the same
        ratio with that model in place of the best one.
    groups
        One task / tag label per row: adds ``task_oracle_value``, the value of calling
        the best model of each group in hindsight (a reference: what knowing the task
        alone would earn).

    Examples
    --------
    >>> r = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    >>> v = routing_value(r, np.array([0, 1, 0, 0]))
    >>> v["value"], v["fixed_reward"], v["oracle_reward"], v["best_model"]
    (1.0, 0.75, 1.0, 0)
    >>> routing_value(r, np.array([1, 1, 0, 0]), baseline=1)["baseline_value"]
    0.6667
    >>> routing_value(r, np.array([0, 0, 0, 0]), groups=["a", "b", "a", "a"])[
    ...     "task_oracle_value"]
    1.0
    """
    r = np.asarray(rewards, dtype=np.float64)
    ch = np.asarray(choices, dtype=np.intp)
    if r.ndim != 2 or ch.shape != (r.shape[0],):
        raise InvalidInputError("choices", "must hold one model index per row of rewards",
                                f"{ch.shape} vs {r.shape}")
    means = r.mean(axis=0)
    best = int(np.argmax(means))
    router = float(r[np.arange(len(ch)), ch].mean())
    oracle = float(r.max(axis=1).mean())

    def ratio(reference: float) -> float:
        room = oracle - reference
        return round((router - reference) / room, 4) if room > 1e-12 else float("nan")

    out = {"value": ratio(float(means[best])), "reward": router,
           "fixed_reward": float(means[best]), "oracle_reward": oracle, "best_model": best}
    if baseline is not None:
        out["baseline_value"] = ratio(float(means[baseline]))
        out["baseline_reward"] = float(means[baseline])
    if groups is not None:
        labels = np.asarray(groups)
        if labels.shape != (r.shape[0],):
            raise InvalidInputError("groups", "must hold one label per row", labels.shape)
        task = 0.0
        for g in np.unique(labels):
            task += float(r[labels == g].sum(axis=0).max())
        task /= r.shape[0]
        room = oracle - float(means[best])
        out["task_oracle_value"] = (round((task - float(means[best])) / room, 4)
                                    if room > 1e-12 else float("nan"))
    return out


def cumulative_regret(log: ReplayLog, preferences: Preferences,
                      choices: Sequence[int]) -> np.ndarray:
    """Cumulative regret curve of a run against the per-query oracle."""
    r = log.rewards(preferences)
    ch = np.asarray(choices)
    return np.cumsum(r.max(axis=1) - r[np.arange(len(ch)), ch])


#: Rows per prequential block of :func:`warm_start` for a policy that selects models.
WARM_START_BLOCK = 32


def warm_start(policy: Policy, x: np.ndarray, log: ReplayLog, *, weight: float = 1.0,
               prior_cost_from_log: bool = True) -> Policy:
    """Fit every arm's heads on a labelled log with every model's outcome (full
    information), so that a deployment starts from this prior instead of from zero.

    ``weight`` (0, 1] discounts the labelled data: a benchmark's prompts are not your
    traffic, and a weight below 1 lets production feedback take over sooner (0.2 makes
    five labelled rows count as one live observation). Arms missing from the policy are
    added (with the log's mean cost as their prior when ``prior_cost_from_log``).
    """
    n = log.outcomes.shape[0]
    if x.shape[0] != n:
        raise InvalidInputError("x", f"must have one row per log row ({n})", x.shape)
    for j, name in enumerate(log.arms):
        if name not in policy.arms:
            prior = ArmPrior(cost_usd=float(log.outcomes[:, j, 1].mean())
                             if prior_cost_from_log else None)
            policy.add_arm(name, prior)
    # A policy that selects among nested models (``context_ridges``, ``tag_ridges``)
    # scores each by its prequential error. In one batch every candidate would predict
    # the whole log from the prior alone (equal errors: the mean would win); in blocks
    # each is scored on rows it has not learned yet, so the warm start carries which
    # model predicts each arm. The sums are the same either way.
    selects = policy.config.context_ridges is not None or policy.config.tag_ridges is not None
    block = WARM_START_BLOCK if selects else max(n, 1)
    for j, name in enumerate(log.arms):
        outcomes = [{"quality": float(q), "cost_usd": float(c),
                     **({} if np.isnan(lat) else {"latency_ms": float(lat)})}
                    for q, c, lat in log.outcomes[:, j]]
        for start in range(0, max(n, 1), block):
            rows = outcomes[start:start + block]
            # A labelled log is not a stream in time: it never feeds the drift detector
            # (a detection would throw most of it away; see Policy.update_batch).
            policy.update_batch([name] * len(rows), x[start:start + block], rows, now=0.0,
                                weight=weight, watch_drift=False)
    return policy
