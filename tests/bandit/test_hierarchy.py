"""The prior across arms (bandit.hierarchy) and ``PolicyConfig.arm_prior="hierarchy"``."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import ArmPrior, InvalidInputError, LinearThompson, LinUCB, Policy, Preferences
from bandit.hierarchy import ArmLevels, learned_prior

POLICIES = [LinUCB, LinearThompson]


def line_arms(slope: float, k: int = 6, n: int = 400):
    """k arms priced 1e-4 .. 1e-2 whose mean quality is 0.5 + slope x centred log price,
    with n observations each (sums exact)."""
    cost = np.geomspace(1e-4, 1e-2, k)
    c = np.log(cost) - np.log(cost).mean()
    means = 0.5 + slope * c
    return cost, means * n, np.full(k, float(n)), means, c


def test_features_centred_log_price_unknown_at_centre():
    z = ArmLevels.features(np.array([1e-3, 1e-1, np.nan]))
    np.testing.assert_allclose(z[:, 0], 1.0)
    np.testing.assert_allclose(z[:, 1], [-0.5 * np.log(100), 0.5 * np.log(100), 0.0])


def test_new_arm_starts_from_the_learned_price_line():
    cost, sums, counts, _, _ = line_arms(slope=0.08)
    levels = ArmLevels()
    dear = learned_prior(levels, cost, sums, counts, new_cost_usd=2e-2)
    cheap = learned_prior(levels, cost, sums, counts, new_cost_usd=5e-5)
    c = np.log([2e-2, 5e-5]) - np.log(cost).mean()  # the line's centre is the old arms'
    # The feature centre moves with the new arm, so compare with the line itself:
    assert dear.quality == pytest.approx(0.5 + 0.08 * c[0], abs=0.03)
    assert cheap.quality == pytest.approx(0.5 + 0.08 * c[1], abs=0.03)
    assert dear.cost_usd == 2e-2
    # Arms on an exact line: the prediction is worth many observations.
    assert dear.strength > 20


def test_no_price_slope_prior_is_the_pooled_mean_and_does_no_harm():
    cost, sums, counts, _, _ = line_arms(slope=0.0)
    rng = np.random.default_rng(3)
    means = np.clip(0.5 + 0.15 * rng.standard_normal(cost.size), 0, 1)  # no price line
    prior = learned_prior(ArmLevels(), cost, means * counts, counts, new_cost_usd=1e-2)
    assert prior.quality == pytest.approx(means.mean(), abs=0.1)
    # Spread arms: the prediction is worth only a few observations (noise 0.25 / var).
    assert prior.strength < 0.25 / 0.1 ** 2


def test_learned_slope_follows_the_data_sign():
    for slope in (0.08, -0.08):
        cost, sums, counts, _, _ = line_arms(slope=slope)
        dear = learned_prior(ArmLevels(), cost, sums, counts, 1e-2).quality
        cheap = learned_prior(ArmLevels(), cost, sums, counts, 1e-4).quality
        assert np.sign(dear - cheap) == np.sign(slope)


def test_two_arms_finite_between_them():
    cost = np.array([6e-4, 1e-2])
    prior = learned_prior(ArmLevels(), cost, np.array([68.0, 80.0]), np.array([100.0, 100.0]),
                          new_cost_usd=None)
    assert 0.6 < prior.quality < 0.9 and np.isfinite(prior.strength)


def test_no_data_prior_is_flat_and_weak():
    m, var = ArmLevels().predict(np.array([1e-3, 1e-2]), np.zeros(2), np.zeros(2))
    np.testing.assert_allclose(m, 0.5)
    assert np.all(var > 0.2)


def test_sample_joint_draw_deterministic_with_seed_and_centred():
    cost, sums, counts, means, _ = line_arms(slope=0.05)
    levels = ArmLevels()
    a = levels.sample(np.random.default_rng(1), cost, sums, counts)
    b = levels.sample(np.random.default_rng(1), cost, sums, counts)
    np.testing.assert_array_equal(a, b)
    draws = np.array([levels.sample(np.random.default_rng(s), cost, sums, counts)
                      for s in range(200)])
    np.testing.assert_allclose(draws.mean(axis=0), means, atol=0.01)


@pytest.mark.parametrize(("call", "field"), [
    (lambda: ArmLevels.features(np.array([-1.0, 1.0])), "cost_usd"),
    (lambda: ArmLevels().predict(np.ones(2), np.ones(3), np.ones(3)), "sums"),
    (lambda: ArmLevels().predict(np.ones(2), np.ones(2), np.array([1.0, -1.0])), "counts"),
    (lambda: ArmLevels(noise=0.0), "noise"),
    (lambda: learned_prior(ArmLevels(), np.ones(1), np.ones(1), np.ones(1), -1.0),
     "prior.cost_usd"),
    (lambda: LinUCB(3, arm_prior="learned"), "arm_prior"),
])
def test_bad_input_names_the_field(call, field):
    with pytest.raises(InvalidInputError) as err:
        call()
    assert err.value.field == field


# ------------------------------------------------------------ the policy hook
def trained(cls: type[Policy], arm_prior: str, seed: int = 5) -> Policy:
    """Three arms on a price line (quality 0.3 / 0.5 / 0.7 at $1e-4 / 1e-3 / 1e-2),
    fed 150 rows each; then a new arm priced $5e-3 is added without a quality."""
    policy = cls(4, seed=seed, arm_prior=arm_prior, drift_delta=None)
    prices = {"a": 1e-4, "b": 1e-3, "c": 1e-2}
    levels = {"a": 0.3, "b": 0.5, "c": 0.7}
    for name, price in prices.items():
        policy.add_arm(name, ArmPrior(cost_usd=price))
    rng = np.random.default_rng(0)
    for _ in range(150):
        x = rng.standard_normal(4)
        for name, q in levels.items():
            policy.update(name, x, {"quality": float(rng.random() < q), "cost_usd": prices[name]})
    policy.add_arm("new", ArmPrior(cost_usd=5e-3))
    return policy


@pytest.mark.parametrize("cls", POLICIES)
def test_policy_hierarchy_new_arm_predicted_from_price(cls):
    learned, declared = trained(cls, "hierarchy"), trained(cls, "declared")
    x = np.zeros(4)
    q_learned = learned.predict(x)["new"].quality
    q_declared = declared.predict(x)["new"].quality
    assert declared._priors["new"].quality is None
    assert q_declared == pytest.approx(0.5, abs=1e-9)
    # log-price line: 0.5 + 0.2 x log10(5) ~ 0.64 (the prior, before any feedback)
    assert q_learned == pytest.approx(0.64, abs=0.05)
    # A declared quality always wins over the learned one.
    learned.add_arm("declared", ArmPrior(quality=0.2, cost_usd=5e-3))
    assert learned._priors["declared"].quality == 0.2


@pytest.mark.parametrize("cls", POLICIES)
def test_policy_hierarchy_inert_before_any_feedback(cls):
    a = cls(3, seed=1, arm_prior="hierarchy")
    b = cls(3, seed=1)
    for p in (a, b):
        p.add_arm("x", ArmPrior(cost_usd=1e-3))
        p.add_arm("y", ArmPrior(cost_usd=1e-2))
    assert a._priors == b._priors


@pytest.mark.parametrize("cls", POLICIES)
def test_policy_hierarchy_same_seed_round_trip_merge_propensities(cls):
    a, b = trained(cls, "hierarchy", seed=9), trained(cls, "hierarchy", seed=9)
    prefs = Preferences(quality=1.0, cost=10.0)
    ctx = np.random.default_rng(2).standard_normal((50, 4))
    ba, bb = a.decide_batch(ctx, prefs), b.decide_batch(ctx, prefs)
    np.testing.assert_array_equal(ba.choices, bb.choices)
    np.testing.assert_array_equal(ba.propensities, bb.propensities)
    # round trip: the learned prior is the arm's prior, restored with it
    restored = Policy.from_bytes(a.to_bytes())
    assert restored.config.arm_prior == "hierarchy"
    assert restored._priors["new"] == a._priors["new"]
    d1, d2 = a.decide(ctx[0], prefs), restored.decide(ctx[0], prefs)
    assert (d1.arm, d1.propensity, d1.scores) == (d2.arm, d2.propensity, d2.scores)
    # merge: an arm only the other replica has arrives with its learned prior
    other = cls(4, seed=3, arm_prior="hierarchy")
    other.add_arm("new", a._priors["new"])
    fresh = cls(4, seed=4, arm_prior="hierarchy")
    fresh.merge(other)
    assert fresh._priors["new"] == a._priors["new"]
    # propensities still a distribution. The learned prior puts the cold arm in the main
    # branch (a known quality), so Thompson's quadrature integrates it: its documented
    # worst case is about 1 / propensity_nodes (LinearThompsonConfig).
    names, probs = a.probabilities(ctx[:5], prefs)
    assert names == ["a", "b", "c", "new"]
    assert np.all(probs[:, -1] > 0.1)  # more than the cold share alone: it competes
    tol = 1e-9 if cls is LinUCB else 1.0 / a.config.propensity_nodes
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=tol)
