"""benchmarks.guarded_exploration on generated data (the real data is for benchmarks)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.guarded_exploration import routing_value, run


def test_routing_value_is_0_for_best_fixed_and_1_for_oracle() -> None:
    rewards = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.5]])
    assert routing_value(rewards[:, 0], rewards) == pytest.approx(0.0)
    assert routing_value(rewards.max(axis=1), rewards) == pytest.approx(1.0)
    assert routing_value(rewards[:, 1], rewards) < 0


def test_run_guarded_stays_within_bound_unguarded_does_not() -> None:
    rng = np.random.default_rng(0)
    n = 800
    kind = rng.integers(0, 2, n)
    x = np.stack([kind, 1 - kind], axis=1).astype(float)
    quality = np.clip(np.stack([np.full(n, 0.6), np.where(kind == 1, 0.9, 0.5),
                                np.full(n, 0.1)], axis=1)
                      + rng.normal(0, 0.1, (n, 3)), 0, 1)
    cost = np.full((n, 3), 1e-4)
    arms = ["base", "good", "bad"]
    rows = np.arange(n)
    slack = {}
    for name, bound in (("guarded", 0.02), ("unguarded", None)):
        # An explicit bonus, so that the premise (unguarded exploration breaks the bound)
        # does not hang on the default policy settings.
        out = run(x, quality, cost, arms, 0.0, 0, bound, seed=3, alpha=1.0)
        gap = np.cumsum(quality[rows, out["choices"]] - quality[:, 0])
        slack[name] = float((gap + 0.02 * np.cumsum(quality[:, 0])).min())
    assert slack["guarded"] >= 0.0
    assert slack["unguarded"] < 0.0
