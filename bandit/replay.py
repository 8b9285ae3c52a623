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
           "warm_start"]


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
           progress: Callable[[int], object] | None = None) -> ReplayRun:
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
    """
    n = log.outcomes.shape[0]
    if x.shape[0] != n:
        raise InvalidInputError("x", f"must have one row per log row ({n})", x.shape)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError("batch_size", "must be an integer >= 1", batch_size)
    for j, name in enumerate(log.arms):
        if name not in policy.arms:
            prior = ArmPrior(cost_usd=float(log.outcomes[:, j, 1].mean())
                             if prior_cost_from_log else None)
            policy.add_arm(name, prior)
    choices = np.empty(n, dtype=np.intp)
    props = np.full(n, np.nan)
    for start in range(0, n, batch_size):
        rows = slice(start, min(start + batch_size, n))
        batch = policy.decide_batch(x[rows], preferences, log.arms, propensities=propensities)
        choices[rows] = batch.choices
        props[rows] = batch.propensities
        for t in range(rows.start, rows.stop):
            j = int(choices[t])
            q, c, lat = log.outcomes[t, j]
            outcome = {"quality": float(q), "cost_usd": float(c)}
            if not np.isnan(lat):
                outcome["latency_ms"] = float(lat)
            policy.update(log.arms[j], x[t], outcome, now=t * seconds_per_row)
        if progress is not None:
            progress(rows.stop)
    return ReplayRun(choices, props, summarize(log, preferences, choices))


def summarize(log: ReplayLog, preferences: Preferences, choices: np.ndarray,
              tail: float = 0.2) -> dict:
    """Mean quality / cost / reward and regret of a run, every single model and the oracle,
    over the whole stream and over its last ``tail`` share."""
    n = len(choices)
    rewards = log.rewards(preferences)
    start = int(round(n * (1 - tail)))
    return {
        "rows": n,
        "preferences": preferences._asdict(),
        "all": _window(log, rewards, choices, slice(0, n)),
        f"last_{int(round(tail * 100))}pct": _window(log, rewards, choices, slice(start, n)),
    }


def _window(log: ReplayLog, rewards: np.ndarray, choices: np.ndarray, rows: slice) -> dict:
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
    return {
        "rows": int(len(ch)),
        "policy": stats(ch),
        "oracle": stats(oracle),
        "random": {"reward": float(r.mean()), "quality": float(out[:, :, 0].mean()),
                   "cost_usd": float(out[:, :, 1].mean())},
        "models": models,
        "best_model": max(models, key=lambda m: models[m]["reward"]),
        "share": {name: float(share[j]) for j, name in enumerate(log.arms)},
    }


def cumulative_regret(log: ReplayLog, preferences: Preferences,
                      choices: Sequence[int]) -> np.ndarray:
    """Cumulative regret curve of a run against the per-query oracle."""
    r = log.rewards(preferences)
    ch = np.asarray(choices)
    return np.cumsum(r.max(axis=1) - r[np.arange(len(ch)), ch])


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
    for j, name in enumerate(log.arms):
        outcomes = [{"quality": float(q), "cost_usd": float(c),
                     **({} if np.isnan(lat) else {"latency_ms": float(lat)})}
                    for q, c, lat in log.outcomes[:, j]]
        # A labelled log is not a stream in time: it never feeds the drift detector
        # (a detection would throw most of it away; see Policy.update_batch).
        policy.update_batch([name] * n, x, outcomes, now=0.0, weight=weight,
                            watch_drift=False)
    return policy
