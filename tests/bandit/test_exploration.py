"""Exploration on the uncertainty of each arm's mean (``exploration="mean"``, issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import ArmPrior, InvalidInputError, LinearThompson, LinUCB, Policy, Preferences

POLICIES = [LinUCB, LinearThompson]


def _trained(cls: type[Policy], exploration: str) -> Policy:
    policy = cls(4, seed=0, drift_delta=None, exploration=exploration)
    policy.add_arm("a", ArmPrior(cost_usd=0.001))
    policy.add_arm("b", ArmPrior(cost_usd=0.002))
    rng = np.random.default_rng(0)
    for t in range(60):
        x = rng.standard_normal(4)
        x /= np.linalg.norm(x)
        arm = "a" if t % 3 else "b"
        policy.update(arm, x, {"quality": float(rng.random() < 0.6), "cost_usd": 0.001},
                      cost_estimate=0.001)
    return policy


@pytest.mark.parametrize("cls", POLICIES)
def test_mean_exploration_width_is_the_arms_mean_uncertainty(cls):
    policy = _trained(cls, "mean")
    prefs = Preferences(quality=1.0, cost=10.0)
    ctx = np.random.default_rng(1).standard_normal((5, 4))
    batch = policy.decide_batch(ctx, prefs, cost_estimate=[0.001, 0.002])
    stats = policy._stats
    # Quality head only: the cost is priced, the latency weight is 0.
    expected = np.sqrt(stats.sigma2[:, 0] / (stats.weight[:, 0] + stats.lam[:, 0]))
    np.testing.assert_allclose(batch.uncertainty, np.tile(expected, (5, 1)), rtol=1e-12)
    # Without a price estimate the cost head's mean uncertainty adds to it.
    unpriced = policy.decide_batch(ctx, prefs)
    cost_var = 100.0 * stats.sigma2[:, 1] / (stats.weight[:, 1] + stats.lam[:, 1])
    np.testing.assert_allclose(unpriced.uncertainty[0], np.sqrt(expected ** 2 + cost_var),
                               rtol=1e-12)
    # The context's own predictive width differs from row to row.
    context = _trained(cls, "context").decide_batch(ctx, prefs, cost_estimate=[0.001, 0.002])
    assert np.ptp(context.uncertainty[:, 0]) > 1e-6


@pytest.mark.parametrize(("cls", "spread"), [(LinearThompson, True), (LinUCB, False)])
def test_thompson_on_means_spreads_equal_arms(cls, spread):
    """Three models of equal quality cannot be told apart: Thompson sampling on the
    means keeps choosing among all three with real probabilities, what off-policy
    evaluation of another policy needs; LinUCB's argmax gives the others only the
    epsilon floor (0.01 / 3)."""
    rng = np.random.default_rng(3)
    params = {"exploration": "mean", "epsilon": 0.01} if spread else {}
    policy = cls(8, seed=7, drift_delta=None, **params)
    for name in "abc":
        policy.add_arm(name)
    for _ in range(120):
        x = rng.standard_normal(8)
        x /= np.linalg.norm(x)
        d = policy.decide(x)
        policy.update(d.arm, x, {"quality": float(rng.random() < 0.6)})
    _, probs = policy.probabilities(rng.standard_normal((20, 8)) / np.sqrt(8))
    if spread:
        assert probs.min() > 0.02
    else:
        assert probs.min() == pytest.approx(0.01 / 3)


@pytest.mark.parametrize("bad", ["x", "", None, 1])
def test_exploration_bad_value_rejected(bad):
    with pytest.raises(InvalidInputError) as err:
        LinUCB(3, exploration=bad)
    assert err.value.field == "exploration"
    assert "context, mean" in str(err.value)
