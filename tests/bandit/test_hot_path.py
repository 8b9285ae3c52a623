"""The single-context fast paths of deciding and learning (issue 19) against the general
paths they short-cut: same numbers (to 1e-12), same errors."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import (
    ArmPrior,
    DimensionError,
    InvalidInputError,
    LinearThompson,
    LinUCB,
    Policy,
    Preferences,
    SelectiveThompson,
)
from bandit.stats import FLOAT32_INVERSE_DIM

PREFS = Preferences(quality=1.0, cost=20.0, latency=0.1)
CONFIGS = [{}, {"context_ridges": (1.0, 100.0)}, {"exploration": "mean"},
           {"shared_ridge": 1.0}]


def trained(cls, d: int = 5, partial: bool = False, compiled: bool = True, seed: int = 2,
            **params):
    """A policy with a few hundred updates; ``partial`` outcomes split the head groups;
    ``compiled`` False: the numpy reference's updates."""
    rng = np.random.default_rng(11)
    policy = cls(d, seed=seed, **params)
    policy._stats.compiled = compiled
    for j in range(4):
        policy.add_arm(f"m{j}", ArmPrior(quality=0.6, cost_usd=0.002) if j == 1 else None)
    for t in range(240):
        x = rng.standard_normal(d)
        outcome = {"quality": float(rng.random()), "cost_usd": 0.001 * (1 + t % 4),
                   "latency_ms": 300.0 + t}
        if partial and t % 3 == 0:
            del outcome["quality"]
        policy.update(f"m{t % 4}", x, outcome)
    return policy


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson])
@pytest.mark.parametrize("params", CONFIGS)
@pytest.mark.parametrize("partial", [False, True])
def test_single_context_predictions_match_the_batch_path(cls, params, partial):
    policy = trained(cls, partial=partial, **params)
    rows = np.random.default_rng(5).standard_normal((2, policy.dim))
    both = policy.decide_batch(rows, PREFS, explore=False)
    for r in range(2):
        one = policy.decide_batch(rows[r], PREFS, explore=False)
        np.testing.assert_allclose(one.means[0], both.means[r], rtol=0, atol=1e-12)
        np.testing.assert_allclose(one.utility[0], both.utility[r], rtol=0, atol=1e-12)
    # Exploration widths: the (n, K*D) product of the batch path against the two gemv.
    explore = policy._assess(rows, PREFS, None, True)
    for r in range(2):
        single = policy._assess(rows[r], PREFS, None, True)
        np.testing.assert_allclose(single.std[0], explore.std[r], rtol=1e-12, atol=1e-12)
    if partial and not params:
        assert not policy._stats.group.all()  # the split-group branch was exercised


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson])
def test_single_context_fast_path_refuses_what_validation_refuses(cls):
    policy = trained(cls)
    good = np.full(policy.dim, 0.1)
    for bad in (np.r_[good[:-1], np.nan], np.r_[good[:-1], np.inf],
                np.r_[good[:-1], -np.inf], np.r_[good[:-1], 1e4]):
        with pytest.raises(InvalidInputError) as info:
            policy.decide(bad)
        assert info.value.field == "x"
        with pytest.raises(InvalidInputError):
            policy.update("m0", bad, {"quality": 1.0})
        # The same value in any row of a batch (the batch fast path).
        batch = np.stack([good, good, bad])
        with pytest.raises(InvalidInputError) as info:
            policy.decide_batch(batch)
        assert info.value.field == "x"
        with pytest.raises(InvalidInputError):
            policy.update_batch(["m0"] * 3, batch, [{"quality": 1.0}] * 3)
    with pytest.raises(DimensionError):
        policy.decide(good[:-1])
    with pytest.raises(InvalidInputError):
        policy.decide_batch(np.zeros((0, policy.dim)))
    # A strided batch (a column slice) takes the fast path too: same rows, same numbers.
    wide = np.full((2, 2 * policy.dim), 0.1)
    np.testing.assert_array_equal(
        policy.decide_batch(wide[:, ::2], PREFS, explore=False).utility,
        policy.decide_batch(np.full((2, policy.dim), 0.1), PREFS, explore=False).utility)
    # Integers and float32 take the general path or the fast one: same decision.
    ints = np.ones(policy.dim, dtype=np.int64)
    a = policy.decide_batch(ints, PREFS, explore=False)
    b = policy.decide_batch(ints.astype(np.float32), PREFS, explore=False)
    np.testing.assert_array_equal(a.utility, b.utility)


def test_inline_outcome_checks_refuse_what_full_checks_refuse():
    policy = trained(LinUCB)
    x = np.zeros(policy.dim)
    for key, value in (("quality", 1.5), ("quality", float("nan")), ("cost_usd", -1.0),
                       ("latency_ms", float("inf")), ("cost_usd", 1e5)):
        with pytest.raises(InvalidInputError) as info:
            policy.update("m0", x, {key: value})
        assert info.value.field == key
    before = policy._stats.theta.copy()
    policy.update("m0", x + 1.0, {"quality": 1.0, "latency_ms": 2000.0})
    assert policy._stats.count[0].tolist()[0] == 61  # 60 in training, then this one
    assert not np.array_equal(before, policy._stats.theta)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("partial", [False, True])
def test_rank_one_updates_in_place_keep_the_inverse_exact(partial, compiled):
    """The in-place rank-one steps (the compiled kernel's, and the numpy reference's
    BLAS ``dger``) keep A^-1 = (data + ridge)^-1 and the data sums of every head equal
    to the sums of the outer products."""
    policy = trained(LinUCB, partial=partial, compiled=compiled, refresh_every=100_000)
    stats = policy._stats
    inv_before = stats.s_inv
    data = stats.matrices("a_data")
    inv = stats.matrices("a_inv")
    eye = np.diag(stats.ridge_diag)
    for k in range(len(stats)):
        for h in range(3):
            expected = np.linalg.inv(data[k, h] + stats.lam[k, h] * eye)
            np.testing.assert_allclose(inv[k, h], expected, rtol=0, atol=1e-9)
    assert stats.s_inv is inv_before  # updated in place, not reallocated
    # The data sums against a direct sum of outer products of the stream.
    rng = np.random.default_rng(11)
    xs = []
    for t in range(240):
        x = rng.standard_normal(policy.dim)
        rng.random()
        xs.append((t % 4, np.r_[x, 1.0], partial and t % 3 == 0))
    for k in range(4):
        rows = np.array([x for arm, x, _ in xs if arm == k])
        np.testing.assert_allclose(data[k, 2], rows.T @ rows, rtol=1e-12, atol=1e-10)


def test_prediction_dicts_equal_the_decisions_predictions():
    policy = trained(LinearThompson)
    xs = np.random.default_rng(3).standard_normal((3, policy.dim))
    decided = policy.decide_batch(xs, PREFS)
    price = np.arange(12, dtype=np.float64).reshape(3, 4)
    rows = decided.prediction_dicts(price_usd=price)
    for r, row in enumerate(rows):
        assert row == {name: {**p.as_dict(), "price_usd": price[r, j]}
                       for j, (name, p) in enumerate(decided.decision(r).predictions.items())}
    assert decided.prediction_dicts()[0] == {
        name: p.as_dict() for name, p in decided.decision(0).predictions.items()}
    with pytest.raises(InvalidInputError) as info:
        decided.prediction_dicts(price_usd=price[:2])
    assert info.value.field == "price_usd"


# ------------------------------------------------- prices checked once (PriceList)
def _raw_estimate(p_in, p_out, out_tokens, tokens):
    """What the service computed per call before PriceList: the formula, unchecked."""
    t = np.array(tokens, dtype=np.float64)
    return (t[:, None] * np.array(p_in) + out_tokens * np.array(p_out)) / 1e6


def _error(call):
    with pytest.raises(InvalidInputError) as info:
        call()
    return type(info.value), info.value.field, info.value.allowed, repr(info.value.value)


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson])
def test_price_list_estimate_decides_like_the_raw_estimate(cls):
    from bandit import PriceList

    names, p_in, p_out = ["m0", "m2", "m3"], [0.5, 3.0, 1e5], [1.5, 15.0, 2.0]
    prices = PriceList(names, p_in, p_out, 300)
    tokens = [100, 0, 2500, 40_000]
    estimate = prices.estimate(tokens)
    raw = _raw_estimate(p_in, p_out, 300, tokens)
    assert estimate.names == names and np.array_equal(estimate.array, raw)
    for t in tokens:  # one request (the service's usual call) takes a shorter way
        assert np.array_equal(prices.estimate([t]).array, _raw_estimate(p_in, p_out, 300, [t]))
    xs = np.random.default_rng(4).standard_normal((4, 5))
    a = trained(cls).decide_batch(xs, PREFS, names, cost_estimate=estimate)
    b = trained(cls).decide_batch(xs, PREFS, names, cost_estimate=raw)
    assert a.choices.tolist() == b.choices.tolist()
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.propensities, b.propensities)


@pytest.mark.parametrize(("p_in", "p_out", "tokens"), [
    ([1.0, 1e5, 2.0], [1.0, 1.0, 1.0], [10, 100_001]),  # past MAX_COST_USD on m2
    ([1.0, 1e5, 2.0], [1.0, 1.0, 1.0], [100_000, 10]),  # exactly on the bound: fine
    ([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [-5]),
    ([1.0, 2.0, 3.0], [1.0, 1.0, 1.0], [float("nan")]),
    ([1.0, float("inf"), 3.0], [1.0, 1.0, 1.0], [10]),
    ([1.0, 2.0, 3.0], [1.0, -1.0, 3.0], [10]),
    ([1.0, 2.0, 3.0], [1.0, 2.0, 4e10], [0]),
])
def test_price_list_checks_exactly_as_a_raw_estimate(p_in, p_out, tokens):
    """Only token counts are checked per call, yet what passes and every error (field,
    message, value) are those of the same numbers passed as a plain array."""
    from bandit import PriceList

    names, policy = ["m0", "m1", "m2"], trained(LinUCB)
    xs = np.zeros((len(tokens), 5))
    raw = _raw_estimate(p_in, p_out, 300, tokens)
    try:
        expected = policy.decide_batch(xs, PREFS, names, cost_estimate=raw)
    except InvalidInputError:
        assert _error(lambda: PriceList(names, p_in, p_out, 300).estimate(tokens)) == \
            _error(lambda: policy.decide_batch(xs, PREFS, names, cost_estimate=raw))
    else:
        estimate = PriceList(names, p_in, p_out, 300).estimate(tokens)
        assert np.array_equal(estimate.array, raw)
        got = policy.decide_batch(xs, PREFS, names, cost_estimate=estimate)
        np.testing.assert_array_equal(got.means, expected.means)


def test_cost_estimate_for_other_candidates_is_checked_again():
    from bandit import CostEstimate, PriceList

    policy = trained(LinUCB)
    estimate = PriceList(["m0", "m1"], [1.0, 2.0], [1.0, 1.0], 300).estimate([10])
    with pytest.raises(InvalidInputError, match="one value per candidate"):
        policy.decide_batch(np.zeros(5), PREFS, ["m0", "m1", "m2"], cost_estimate=estimate)
    forged = CostEstimate(["m0", "m1"], np.array([[0.1, -1.0]]))
    assert _error(lambda: policy.decide_batch(np.zeros(5), PREFS, ["m1", "m0"],
                                              cost_estimate=forged))[1] == "cost_estimate.m0"


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson])
def test_cost_factor_follows_every_update(cls):
    """The price correction is cached per policy version: cost feedback moves the very
    next decision's predicted cost."""
    policy = trained(cls)
    names, x = policy.arms, np.zeros(5)
    estimate = np.full(len(names), 0.01)
    for _ in range(3):
        got = policy.decide_batch(x, PREFS, names, cost_estimate=estimate)
        fresh = estimate * policy._stats.cost_factor(policy.config.price_strength)
        np.testing.assert_allclose(got.means[0, :, 1], fresh, rtol=1e-12)
        policy.update("m1", x, {"quality": 0.5, "cost_usd": 0.05, "latency_ms": 100.0},
                      cost_estimate=0.01)
    assert policy.decide_batch(x, PREFS, names, cost_estimate=estimate).means[0, 1, 1] > 0.01


def _warm_pair(cls, d: int = 6, **params) -> tuple[Policy, Policy]:
    """The same policy twice, the compiled decide's (fused) and the numpy path's, every
    arm warm (past cold_start_pulls: the fused decide applies); updates at time 0."""
    rng = np.random.default_rng(3)
    pair = []
    for compiled in (True, False):
        policy = cls(d, seed=7, epsilon=0.05, **params)
        policy._stats.compiled = compiled
        for j in range(4):
            policy.add_arm(f"m{j}")
        pair.append(policy)
    for t in range(80):
        x, q = rng.standard_normal(d), float(rng.random())
        for policy in pair:
            policy.update(f"m{t % 4}", x, {"quality": q, "cost_usd": 0.001 * (1 + t % 4),
                                            "latency_ms": 400.0 + 10 * (t % 7)}, now=0.0)
    return pair[0], pair[1]


def _assert_same_decisions(fused: Policy, reference: Policy, prefs=PREFS, n: int = 12,
                           seed: int = 0) -> None:
    # From FLOAT32_INVERSE_DIM features on, the widths use float32 copies of the inverses
    # (relative error ~3e-9); a stale copy is off by far more (3.7x after a decay).
    tol = 1e-9 if fused.dim + 1 < FLOAT32_INVERSE_DIM else 1e-7
    plan = fused._fused_plan()
    assert plan.rule is not None and plan.n_cold == 0  # the fused decide is the one tested
    rows = np.random.default_rng(seed).standard_normal((n, fused.dim))
    for x in rows:
        a, b = fused.decide(x, prefs), reference.decide(x, prefs)
        assert (a.arm, a.explored) == (b.arm, b.explored)
        assert a.propensity == pytest.approx(b.propensity, rel=0, abs=tol)
        assert list(a.predictions) == list(b.predictions)
        for name, p in a.predictions.items():
            np.testing.assert_allclose(p, b.predictions[name], rtol=tol, atol=tol)


@pytest.mark.parametrize("d", [6, 260])  # 260: the plan's float32 inverse copies
@pytest.mark.parametrize("cls", [LinUCB, LinearThompson, SelectiveThompson])
def test_fused_plan_follows_every_change_of_state(cls, d):
    """The compiled decide keeps its per-state plan (arms, rule, cold arms, inverses)
    between decides: after an update, a merge, a prior's change, an arm removed and
    another added, a restore, a change of preferences, a refused update and a decay, it
    decides as the numpy path that keeps nothing."""
    fused, reference = _warm_pair(cls, d)
    _assert_same_decisions(fused, reference)
    x = np.full(fused.dim, 0.3)
    for policy in (fused, reference):  # one outcome that moves m2 far up
        for _ in range(30):
            policy.update("m2", x, {"quality": 1.0, "cost_usd": 0.0001, "latency_ms": 50.0})
    _assert_same_decisions(fused, reference, seed=1)
    others = _warm_pair(cls, d)
    for policy, other in zip((fused, reference), others, strict=True):
        policy.merge(other)
    _assert_same_decisions(fused, reference, seed=2)
    for policy in (fused, reference):
        policy.set_prior("m1", ArmPrior(quality=0.9, cost_usd=1e-4))  # groups kept
    _assert_same_decisions(fused, reference, seed=3)
    for policy in (fused, reference):
        policy.remove_arm("m0")
        policy.add_arm("m9", ArmPrior(quality=0.5))
        for t in range(12):  # warm: the fused decide applies again
            policy.update("m9", np.full(policy.dim, 0.1 * (t % 3)), {
                "quality": 0.2, "cost_usd": 0.002, "latency_ms": 900.0})
    _assert_same_decisions(fused, reference, seed=4)
    assert "m0" not in fused._fused_plan().names
    fused, reference = (Policy.from_bytes(p.to_bytes()) for p in (fused, reference))
    reference._stats.compiled = False
    _assert_same_decisions(fused, reference, seed=5)
    _assert_same_decisions(fused, reference, prefs=Preferences(quality=1.0, cost=500.0),
                           seed=6)
    _assert_same_decisions(fused, reference, prefs=Preferences(1, 0, 2), seed=7)
    # Forgetting: an update ten half-lives later refused for its cost_estimate teaches
    # nothing (no decay either); the next accepted one decays, and the plan follows both.
    fused, reference = _warm_pair(cls, d, half_life_hours=1.0, decay_interval_s=0.0)
    _assert_same_decisions(fused, reference, seed=8)
    weights = fused._stats.weight.copy()
    outcome = {"quality": 0.5, "cost_usd": 0.001, "latency_ms": 300.0}
    for policy in (fused, reference):
        with pytest.raises(InvalidInputError, match="cost_estimate"):
            policy.update("m0", np.full(d, 0.3), outcome,
                          now=36000.0, cost_estimate=-1.0)
    np.testing.assert_array_equal(fused._stats.weight, weights)
    _assert_same_decisions(fused, reference, seed=9)
    for policy in (fused, reference):
        policy.update("m0", np.full(d, 0.3), outcome, now=36000.0, cost_estimate=0.001)
    _assert_same_decisions(fused, reference, seed=10)


def test_fused_plan_built_during_a_change_is_not_kept():
    """A change of state (another thread's add_arm) while a decide builds its plan: the
    plan carries the version read before the state, so the next decide builds it again
    instead of keeping cold flags and names of two different states."""
    fused, _ = _warm_pair(LinUCB)
    build_cold_block = fused._cold_block

    def interleaved():
        del fused._cold_block  # once
        fused.add_arm("m9", late=False)  # between the plan's reads of the state
        return build_cold_block()

    fused._cold_block = interleaved
    fused.decide(np.full(fused.dim, 0.3), PREFS)
    plan = fused._fused_plan()
    assert plan.names == fused.arms
    assert plan.cold.tolist() == [False] * 4 + [True] and plan.n_cold == 1


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson])
def test_refused_decide_draws_nothing_on_either_path(cls):
    """decide() with two contexts is refused before any draw on the compiled path and on
    the numpy path alike: the same seed decides the same afterwards."""
    fused, reference = _warm_pair(cls)
    two = np.random.default_rng(1).standard_normal((2, fused.dim))
    for policy in (fused, reference):
        with pytest.raises(InvalidInputError, match="one context"):
            policy.decide(two, PREFS)
        with pytest.raises(InvalidInputError, match="one context"):
            policy.decide(two.tolist(), PREFS)
    _assert_same_decisions(fused, reference, n=20)


def test_arm_changes_release_the_plan():
    """add_arm, remove_arm and a merge that adds arms replace the statistics' arrays: the
    plan (which holds the old ones) is dropped at once, not at the next decide."""
    fused, _ = _warm_pair(LinUCB)
    other, _ = _warm_pair(LinUCB)
    other.add_arm("m8")
    changes = [lambda: fused.add_arm("m9"), lambda: fused.remove_arm("m9"),
               lambda: fused.merge(other)]
    for change in changes:
        fused.decide(np.full(fused.dim, 0.3), PREFS)
        assert fused._plan is not None
        change()
        assert fused._plan is None


def test_single_context_copy_matches_the_batch_copy():
    """``copy_bounded_row`` (decide's one context) copies and checks as ``copy_bounded``
    does for the same row, strided or not: the same row, the bias 1, the same verdict."""
    from bandit._policy_kernel import copy_bounded, copy_bounded_row

    rng = np.random.default_rng(3)
    wide = rng.uniform(-2.0, 2.0, (4, 14))
    for x in (wide[0, :7], wide[1, ::2], np.r_[wide[2, :6], np.nan], np.r_[wide[3, :6], 3.0],
              np.r_[-np.inf, wide[3, :6]]):
        one, batch = np.full((1, 8), 7.0), np.full((1, 8), 7.0)
        assert copy_bounded_row(x, one, 2.5) == copy_bounded(x[None], batch, 2.5)
        np.testing.assert_array_equal(one, batch)
        assert one[0, -1] == 1.0


@pytest.mark.parametrize("cls", [LinearThompson, SelectiveThompson])
def test_concurrent_decides_draw_their_own_noise(cls):
    """Threads deciding at once (the compiled decide releases the GIL while it reads
    Thompson's noise, which the policy draws into a buffer) decide as each would alone:
    the same arms, propensities and scores as the same policies one after the other."""
    import threading

    xs = np.random.default_rng(6).uniform(-1.0, 1.0, (400, 5))
    seeds = (2, 9, 10, 11)
    want = [[_fingerprint(p.decide(x, PREFS)) for x in xs]
            for p in (trained(cls, seed=s) for s in seeds)]
    policies = [trained(cls, seed=s) for s in seeds]
    got: list[list] = [[] for _ in seeds]
    start = threading.Barrier(len(seeds))

    def run(i: int) -> None:
        start.wait()
        got[i] = [_fingerprint(policies[i].decide(x, PREFS)) for x in xs]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(seeds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want


def _fingerprint(d) -> tuple:
    return d.arm, d.propensity, tuple(p.score for p in d.predictions.values())
