"""Price-aware cost, bounded optimism, the shared component, routing value and the
checkpoint format (issue 13)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from bandit import (
    ArmPrior,
    InvalidInputError,
    LinearThompson,
    LinUCB,
    Policy,
    Preferences,
    SelectiveThompson,
)
from bandit.replay import routing_value

POLICIES = [LinUCB, LinearThompson]


def _trained(cls: type[Policy], **params: object) -> Policy:
    policy = cls(3, seed=0, drift_delta=None, **params)
    policy.add_arm("small", ArmPrior(cost_usd=0.001))
    policy.add_arm("large", ArmPrior(cost_usd=0.01))
    rng = np.random.default_rng(0)
    for _ in range(40):
        x = rng.standard_normal(3) / 2
        policy.update("small", x, {"quality": 0.6, "cost_usd": 0.002}, cost_estimate=0.001)
        policy.update("large", x, {"quality": 0.9, "cost_usd": 0.01}, cost_estimate=0.01)
    return policy


@pytest.mark.parametrize("cls", POLICIES)
def test_decide_cost_estimate_is_price_times_learned_ratio(cls):
    policy = _trained(cls)
    x = [0.1, 0.2, 0.3]
    batch = policy.decide_batch(x, Preferences(cost=10.0), cost_estimate=[0.004, 0.05])
    # small: observed twice its estimate on 40 calls, shrunk toward 1 by 10 pseudo-calls
    factor = (10 + 40 * 2.0) / (10 + 40)
    np.testing.assert_allclose(batch.means[0, :, 1], [0.004 * factor, 0.05], rtol=1e-12)
    # The price is known: the cost head adds no uncertainty to the utility.
    quality_only = policy.decide_batch(x, Preferences(cost=0.0), cost_estimate=[0.004, 0.05])
    np.testing.assert_allclose(batch.uncertainty, quality_only.uncertainty, rtol=1e-12)


@pytest.mark.parametrize("bad", [[0.1], [0.1, float("nan")], [0.1, -1.0], "cheap"])
def test_decide_cost_estimate_bad_value_rejected_nothing_changes(bad):
    policy = _trained(LinUCB)
    before = policy.to_bytes()
    with pytest.raises(InvalidInputError) as err:
        policy.decide([0.0, 0.0, 0.0], cost_estimate=bad)
    assert err.value.field.startswith("cost_estimate")
    assert policy.to_bytes() == before


@pytest.mark.parametrize("cls", POLICIES)
@pytest.mark.parametrize("bad", [-0.01, float("inf"), 1e9])
def test_update_cost_estimate_bad_value_rejected_nothing_learned(cls, bad):
    # A refused update teaches nothing: the arm's sums stay as they were, so the
    # caller's retry with a good estimate counts the outcome once.
    policy = _trained(cls)
    before = policy.to_bytes()
    with pytest.raises(InvalidInputError) as err:
        policy.update("small", [0.1, 0.2, 0.3], {"quality": 0.5, "cost_usd": 0.002},
                      cost_estimate=bad)
    assert err.value.field.startswith("cost_estimate")
    assert policy.to_bytes() == before


def test_decide_cost_estimate_mapping_needs_every_candidate():
    policy = _trained(LinUCB)
    with pytest.raises(InvalidInputError) as err:
        policy.decide([0.0, 0.0, 0.0], cost_estimate={"small": 0.001})
    assert err.value.field == "cost_estimate.large"
    d = policy.decide([0.0, 0.0, 0.0], cost_estimate={"small": 0.001, "large": 0.01})
    assert d.predictions["large"].cost_usd == pytest.approx(0.01, rel=1e-9)


@pytest.mark.parametrize("bounded", [True, False])
def test_bounded_optimism_arm_that_cannot_win_is_never_explored(bounded):
    # "large" costs 0.01 USD; at cost weight 100 even perfect quality earns it 0.0,
    # below "small" (quality 0.6 - 0.1). Its few noisy observations leave it uncertain.
    policy = LinUCB(3, seed=0, alpha=3.0, epsilon=0.0, drift_delta=None,
                    bounded_optimism=bounded, shared_ridge=None)
    policy.add_arm("small", ArmPrior(cost_usd=0.001))
    policy.add_arm("large", ArmPrior(cost_usd=0.01))
    rng = np.random.default_rng(1)
    for t in range(30):
        x = rng.standard_normal(3)
        policy.update("small", x, {"quality": 0.6, "cost_usd": 0.001})
        if t < 10:
            policy.update("large", x, {"quality": float(rng.random() < 0.9),
                                       "cost_usd": 0.01})
    ctx = rng.standard_normal((500, 3)) * 3
    batch = policy.decide_batch(ctx, Preferences(cost=100.0),
                                cost_estimate=np.tile([0.001, 0.01], (500, 1)))
    large = int((batch.choices == 1).sum())
    if bounded:
        assert large == 0
    else:
        assert large > 0  # the same bonus, unbounded, buys hopeless exploration


def test_shared_component_equals_joint_ridge_solution():
    rng = np.random.default_rng(0)
    d, k = 3, 3
    policy = LinUCB(d, seed=0, shared_ridge=2.0, context_ridge=5.0, drift_delta=None)
    for name in "abc":
        policy.add_arm(name)
    x = rng.standard_normal((40, d))
    arms = rng.integers(0, 2, 40)  # arm "c" never plays
    y = rng.random(40)
    for xi, a, q in zip(x, arms, y, strict=True):
        policy.update("abc"[a], xi, {"quality": float(q)}, now=0.0)
    # One ridge regression over [beta, theta_a, theta_b, theta_c]: quality = x.(beta +
    # theta_arm); beta ~ ridge 2; theta ~ ridge diag(5, 5, 5, 1) around (0, 0, 0, 0.5).
    n_feat = d + 1
    xb = np.c_[x, np.ones(40)]
    design = np.zeros((40, n_feat * (k + 1)))
    design[:, :n_feat] = xb
    for i, a in enumerate(arms):
        design[i, n_feat * (a + 1): n_feat * (a + 2)] = xb[i]
    penalty = np.diag(np.r_[np.full(n_feat, 2.0), np.tile([5.0, 5.0, 5.0, 1.0], k)])
    prior = np.zeros(n_feat * (k + 1))
    prior[n_feat * 2 - 1::n_feat] = 0.5
    sol = np.linalg.solve(design.T @ design + penalty, design.T @ y + penalty @ prior)
    preds = policy.predict(x[0])
    for j, name in enumerate("abc"):
        joint = xb[0] @ (sol[:n_feat] + sol[n_feat * (j + 1): n_feat * (j + 2)])
        assert preds[name].quality == pytest.approx(joint, abs=1e-10)
    # A model that never played is predicted by the shared part (plus its prior).
    assert preds["c"].quality == pytest.approx(xb[0] @ (sol[:n_feat] + prior[-n_feat:]),
                                               abs=1e-10)


def test_add_arm_shared_starts_from_shared_estimate():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 3))
    hard = x[:, 0] > 0  # every model does worse on "hard" queries
    fresh = {}
    for shared in (1.0, None):
        policy = LinUCB(3, seed=0, shared_ridge=shared, context_ridge=1.0, drift_delta=None)
        policy.add_arm("a")
        policy.add_arm("b")
        for xi, h in zip(x, hard, strict=True):
            for arm in "ab":
                policy.update(arm, xi, {"quality": 0.2 if h else 0.9}, now=0.0)
        policy.add_arm("new")
        fresh[shared] = policy.predict([2.0, 0.0, 0.0])["new"].quality
    # With the shared component the new model already expects a hard query to be hard.
    assert fresh[1.0] < 0.4
    assert fresh[None] == pytest.approx(0.5, abs=1e-9)  # alone: just its prior


@pytest.mark.parametrize("cls", POLICIES)
def test_merge_price_ratios_equal_one_replica(cls):
    one, left, right = (cls(2, seed=0, drift_delta=None) for _ in range(3))
    for p in (one, left, right):
        p.add_arm("m", ArmPrior(cost_usd=0.001))
    events = [([1.0, 0.0], 0.003, 0.001), ([0.0, 1.0], 0.001, 0.002), ([1.0, 1.0], 0.004, 0.002)]
    for i, (x, cost, est) in enumerate(events):
        one.update("m", x, {"quality": 0.5, "cost_usd": cost}, cost_estimate=est)
        (left if i % 2 else right).update("m", x, {"quality": 0.5, "cost_usd": cost},
                                          cost_estimate=est)
    merged = left.merge(right)
    np.testing.assert_allclose(merged._stats.price_ratio, one._stats.price_ratio, rtol=1e-12)
    assert one._stats.price_ratio[0].tolist() == pytest.approx([3.0 + 0.5 + 2.0, 3.0])


def test_from_bytes_format_1_migrates_and_unknown_format_refused():
    import json

    policy = _trained(LinUCB)
    data = policy.to_bytes()
    size = int.from_bytes(data[6:10], "big")
    header = json.loads(data[10:10 + size])
    # A format-1 file: no price ratios, old settings, inverses under a ridge of 1.
    header["format"] = 1
    for key in ("context_ridge", "price_strength", "bounded_optimism", "shared_ridge"):
        header["config"].pop(key)
    import io

    arrays = np.load(io.BytesIO(data[10 + size:]))
    buf = io.BytesIO()
    np.savez(buf, **{k: arrays[k] for k in arrays.files if k != "price_ratio"})
    raw = json.dumps(header).encode()
    old = data[:6] + len(raw).to_bytes(4, "big") + raw + buf.getvalue()
    restored = Policy.from_bytes(old)
    assert restored._stats.price_ratio.tolist() == [[0.0, 0.0], [0.0, 0.0]]
    # The inverses are recomputed with this version's ridge, not read stale.
    fresh = Policy.from_bytes(data)
    np.testing.assert_allclose(restored._stats.s_inv, fresh._stats.s_inv, rtol=1e-9)
    header["format"] = 99
    raw = json.dumps(header).encode()
    with pytest.raises(InvalidInputError, match="format 99"):
        Policy.from_bytes(data[:6] + len(raw).to_bytes(4, "big") + raw + buf.getvalue())


def test_routing_value_fixed_oracle_baseline_and_tasks():
    r = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    best = routing_value(r, np.zeros(4, dtype=int), baseline=1, groups=list("abaa"))
    assert best["value"] == 0.0 and best["best_model"] == 0
    assert best["baseline_value"] == pytest.approx((0.75 - 0.25) / (1.0 - 0.25), abs=1e-4)
    assert best["task_oracle_value"] == pytest.approx(1.0)
    assert routing_value(r, np.array([0, 1, 0, 0]))["value"] == 1.0
    assert routing_value(r, np.ones(4, dtype=int))["value"] == pytest.approx(-2.0)
    assert np.isnan(routing_value(np.ones((3, 2)), np.zeros(3, dtype=int))["value"])
    with pytest.raises(InvalidInputError):
        routing_value(r, np.zeros(3, dtype=int))


_ESTIMATES = [0.0, -0.0, 5e-324, 1e-300, 0.001, 0.3, 1e4, float("nan")]
_COSTS = [0.0, 1e-9, 0.002, 1e4, float("nan")]


def test_price_ratio_of_one_outcome_is_the_array_versions_number():
    from bandit.base import _price_ratio, _price_ratios

    for est in _ESTIMATES:
        for cost in _COSTS:
            # The same warnings too (5e-324: numpy's overflow warning).
            with warnings.catch_warnings(record=True) as want_warned:
                warnings.simplefilter("always")
                want = _price_ratios([est], np.array([cost]))[0]
            with warnings.catch_warnings(record=True) as got_warned:
                warnings.simplefilter("always")
                got = _price_ratio(est, cost)
            assert [str(w.message) for w in got_warned] == \
                [str(w.message) for w in want_warned], (est, cost)
            assert type(got) is float
            # Bit for bit, NaN where the array version's is (5e-324 overflows to inf).
            assert np.array([got]).tobytes() == np.array([want]).tobytes(), (est, cost)
    for bad in (-1.0, 1e4 + 1, float("inf"), -float("inf"), "0.1x", [0.1, 0.2]):
        with pytest.raises((InvalidInputError, ValueError)) as want_err:
            _price_ratios([bad], np.array([0.002]))
        with pytest.raises(want_err.type) as got_err:
            _price_ratio(bad, 0.002)
        assert str(got_err.value) == str(want_err.value)


@pytest.mark.filterwarnings("ignore:overflow encountered in divide")
@pytest.mark.parametrize("cls", [LinUCB, LinearThompson, SelectiveThompson])
def test_update_float_estimate_learns_as_the_array_path(cls):
    # A numpy float64 estimate takes the array version; a float the one-outcome path.
    fast, slow = (cls(2, seed=0, drift_delta=None) for _ in range(2))
    for p in (fast, slow):
        p.add_arm("m", ArmPrior(cost_usd=0.001))
    rng = np.random.default_rng(1)
    for est in _ESTIMATES * 3:
        x, cost = rng.standard_normal(2) / 2, float(rng.uniform(0, 0.01))
        fast.update("m", x, {"quality": 0.5, "cost_usd": cost}, cost_estimate=est)
        slow.update("m", x, {"quality": 0.5, "cost_usd": cost},
                    cost_estimate=np.float64(est))
    assert fast._stats.price_ratio.tobytes() == slow._stats.price_ratio.tobytes()
    assert fast._stats.price_ratio[0, 1] > 0  # some ratios were learned
    before = fast._stats.price_ratio.copy()
    with pytest.raises(InvalidInputError, match="cost_estimate"):
        fast.update("m", [0.1, 0.2], {"quality": 0.5, "cost_usd": 0.002}, cost_estimate=-1.0)
    assert fast._stats.price_ratio.tobytes() == before.tobytes()  # nothing learned


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson, SelectiveThompson])
@pytest.mark.parametrize("tiny", [5e-324, 1e-300, 1e-15, 1e-12])
def test_tiny_price_estimate_teaches_no_ratio(cls, tiny):
    """A positive but tiny estimate (a denormal; a price of ~1e-12 USD per Mtok) is a
    free model's: no ratio learned, by update() or update_batch(), so no inf or huge
    ratio stays in the arm's sums and its cost correction stays finite."""
    from bandit.base import MIN_PRICE_ESTIMATE_USD

    assert tiny < MIN_PRICE_ESTIMATE_USD
    one, many = (cls(2, seed=0, drift_delta=None) for _ in range(2))
    for p in (one, many):
        p.add_arm("free", ArmPrior(cost_usd=0.001))
        p.add_arm("paid", ArmPrior(cost_usd=0.001))
    x = np.array([[0.1, 0.2], [0.3, -0.1]])
    y = {"quality": 0.5, "cost_usd": 0.002}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow either
        for row in x:
            one.update("free", row, y, cost_estimate=tiny)
            one.update("paid", row, y, cost_estimate=0.001)
        many.update_batch(["free", "paid", "free", "paid"], np.repeat(x, 2, axis=0),
                          [y] * 4, cost_estimates=[tiny, 0.001, tiny, 0.001])
    for p in (one, many):
        assert p._stats.price_ratio[0].tolist() == [0.0, 0.0]  # nothing learned
        assert p._stats.price_ratio[1].tolist() == pytest.approx([4.0, 2.0])
        factor = p._cost_factor()
        assert np.isfinite(factor).all() and factor[0] == 1.0
        d = p.decide_batch(x, Preferences(cost=10.0), cost_estimate=[tiny, 0.001])
        assert np.isfinite(d.means).all() and np.isfinite(d.utility).all()


def test_price_ratio_floor_is_the_same_on_both_paths():
    """At and around the floor the one-outcome and the array versions agree."""
    from bandit.base import MIN_PRICE_ESTIMATE_USD, _price_ratio, _price_ratios

    for est in (MIN_PRICE_ESTIMATE_USD, np.nextafter(MIN_PRICE_ESTIMATE_USD, 0.0),
                2 * MIN_PRICE_ESTIMATE_USD):
        want = _price_ratios([est], np.array([1e4]))[0]
        got = _price_ratio(float(est), 1e4)
        assert np.array([got]).tobytes() == np.array([want]).tobytes(), est
        assert np.isnan(got) == (est < MIN_PRICE_ESTIMATE_USD)
        assert np.isnan(got) or np.isfinite(got)


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson, SelectiveThompson])
def test_inf_price_ratio_of_an_earlier_checkpoint_dropped_on_load(cls):
    """A checkpoint written before MIN_PRICE_ESTIMATE_USD may hold an inf ratio sum (a
    denormal estimate): restored, that arm's price sums start afresh (its correction the
    declared price again; a replay under the rule would keep the arm's finite ratios,
    which a sum no longer tells apart); the other arms' stay."""
    policy = _trained(cls)
    policy._stats.price_ratio[0] = [np.inf, 41.0]
    kept = policy._stats.price_ratio[1].copy()
    restored = Policy.from_bytes(policy.to_bytes())
    assert restored._stats.price_ratio[0].tolist() == [0.0, 0.0]
    np.testing.assert_array_equal(restored._stats.price_ratio[1], kept)
    factor = restored._cost_factor()
    assert np.isfinite(factor).all() and factor[0] == 1.0


def _stats_with_arms(n: int):
    from bandit.stats import ArmStatistics

    stats = ArmStatistics(2)
    for _ in range(n):
        stats.append(np.array([1.0, 1.0, 1.0]), np.array([0.5, 0.001, 0.3]),
                     np.array([0.5, 0.001, 1.0]))
    return stats


def test_add_price_ratios_of_one_float_outcome_is_the_array_sum(monkeypatch):
    # update()'s call (one float ratio, one float weight): the same sums bit for bit as
    # the array path, and no numpy call on one-element arrays (~6 us, per policy kind).
    rng = np.random.default_rng(3)
    ratios = [0.0, -0.0, 1e-300, 0.5, 1.0, 3.7, 1e300, float("inf")] + list(
        rng.lognormal(0.0, 2.0, 40))
    weights = [1.0, 0.5, 1e-3, 0.999] + list(rng.uniform(0.0, 1.0, 8))
    fast, slow = _stats_with_arms(2), _stats_with_arms(2)
    for i, (r, w) in enumerate(zip(ratios * 3, weights * 12, strict=False)):
        slow.add_price_ratios(i % 2, np.array([r]), np.float64(w))
        with monkeypatch.context() as m:
            m.setattr(np, "broadcast_to", None)  # the float path must not need it
            fast.add_price_ratios(i % 2, float(r), float(w))
        assert fast.price_ratio.tobytes() == slow.price_ratio.tobytes(), (r, w)
    fast.add_price_ratios(0, 2.0)  # the default weight, a float too
    slow.add_price_ratios(0, np.array([2.0]))
    assert fast.price_ratio.tobytes() == slow.price_ratio.tobytes()
