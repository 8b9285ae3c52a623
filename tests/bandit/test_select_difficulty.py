"""SelectiveThompson's shared query difficulty (``shared_difficulty``): the selection
bias of a model learned on the queries another model sent it (issue 13, docs/results.md
"A difficulty shared by every model")."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import ArmPrior, InvalidInputError, Policy, Preferences, SelectiveThompson
from bandit.select import ArmSums, SharedDifficulty
from bandit.stats import ArmStatistics
from benchmarks.difficulty_update_speed import stacked_arm_sums

DIM = 32
COST_WEIGHT = 0.06  # quality points per USD: half the strong model's edge


def _stream(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A difficulty every model shares (spread over 16 of 32 directions, as hashed text
    spreads it), strong = weak + 0.12 on every query. At the cost weight the strong
    model (1 USD) is worth calling on every query."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)) / np.sqrt(DIM)
    hard = x[:, :16].sum(axis=1) * np.sqrt(DIM / 16)
    weak = np.clip(0.62 - 0.3 * hard, 0.02, 0.98)
    p = np.stack([np.clip(weak + 0.12, 0.0, 1.0), weak], axis=1)
    return x, (rng.random((n, 2)) < p).astype(float), p


def _route(seed: int, difficulty: bool, warm: int = 1000,
           n: int = 1500) -> tuple[np.ndarray, Policy]:
    """The weak model alone for ``warm`` queries (it learns how hard a query is: its
    text model is admitted), then both for ``n`` (the strong one added). Returns the
    choices of the second phase (0 = strong) and the policy."""
    x, q, _ = _stream(seed, warm + n)
    policy = SelectiveThompson(DIM, seed=seed, shared_difficulty=difficulty)
    policy.add_arm("strong", ArmPrior(cost_usd=1.0))
    policy.add_arm("weak", ArmPrior(cost_usd=0.0))
    prefs = Preferences(cost=COST_WEIGHT)
    choices = []
    for t in range(warm + n):
        decision = policy.decide(x[t], prefs, candidates=["weak"] if t < warm else None)
        k = policy.arms.index(decision.arm)
        policy.update(decision.arm, x[t], {"quality": q[t, k], "cost_usd": 1.0 - k})
        if t >= warm:
            choices.append(k)
    return np.array(choices), policy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_difficulty_removes_selection_bias(seed):
    """Once the strong model joins, the weak model's text model sends it the queries
    it predicts hard; the strong model's mean, learned on them, sits far below its
    quality (0.74 at the mean query) and it stops being called (select: under 20% of
    the last 500). With the shared difficulty the strong model learns quality minus
    the difficulty the weak model's outcomes taught: predicted at its quality, it
    takes the stream."""
    plain, plain_policy = _route(seed, False)
    fixed, fixed_policy = _route(seed, True)
    x0 = np.zeros(DIM)
    assert (plain[-500:] == 0).mean() < 0.2
    assert plain_policy.predict(x0)["strong"].quality < 0.62
    assert (fixed[-500:] == 0).mean() > 0.9
    assert fixed_policy.predict(x0)["strong"].quality == pytest.approx(0.74, abs=0.05)


def _sums(xs: list[np.ndarray], ys: list[np.ndarray], arms: int = 2) -> ArmSums:
    """The sums of arms 0, 1, ... fed xs[k], ys[k] (the later ones none yet)."""
    d = 4
    rows = [(x, y) for x, y in zip(xs, ys, strict=True)]
    rows += [(np.zeros((0, d)), np.zeros(0))] * (arms - len(rows))
    return ArmSums(sum(x.T @ x for x, _ in rows), sum(x.T @ y for x, y in rows),
                   np.array([float(len(y)) for _, y in rows]),
                   np.array([y.sum() for _, y in rows]),
                   np.array([x.sum(axis=0) for x, _ in rows]))


def test_difficulty_is_not_biased_by_which_arm_saw_which_queries():
    """Arm a sees only hard queries, b only easy ones, a 0.3 better: pooling them (one
    mean) would read a's edge as a slope; the fit with a mean per arm recovers the
    common slope."""
    rng = np.random.default_rng(0)
    beta = np.array([-0.4, 0.2, 0.0])
    ridges = np.array([[1.0, 1.0, 1.0, 1.0]])
    shared = SharedDifficulty(ridges)
    xs, ys = [], []
    for k, (centre, offset) in enumerate(((1.0, 0.8), (-1.0, 0.5))):
        x = rng.standard_normal((4000, 3)) * 0.5
        x[:, 0] += centre
        y = offset + x @ beta + 0.05 * rng.standard_normal(4000)
        shared.observe(_sums(xs, ys), [k] * 4000, np.c_[x, np.ones(4000)], y, 1.0)
        xs.append(np.c_[x, np.ones(4000)])
        ys.append(y)
    sums = _sums(xs, ys)
    fit = shared.fits(sums)[0]
    assert fit[:3] == pytest.approx(beta, abs=0.02)
    # Centred: the mean context (0 here, the arms' centres cancel) has shift ~0.
    assert fit[-1] == pytest.approx(0.0, abs=0.03)
    pooled = np.linalg.lstsq(np.vstack(xs), np.concatenate(ys), rcond=None)[0]
    assert abs(pooled[0] - beta[0]) > 0.1  # one mean for both: a's edge read as slope
    # Its candidates beat "no difficulty" prequentially, so the shift is used.
    assert shared.err[1] < shared.err[0]
    assert shared.coefficients(sums) == pytest.approx(fit)


def test_difficulty_unused_until_it_pays():
    """Quality that does not depend on the context: "no difficulty" keeps the lowest
    prequential error and the policy's arms learn plain quality."""
    rng = np.random.default_rng(1)
    policy = SelectiveThompson(4, seed=1, shared_difficulty=True, drift_delta=None)
    policy.add_arm("a")
    policy.add_arm("b")
    for t in range(400):
        policy.update("ab"[t % 2], rng.standard_normal(4),
                      {"quality": float(rng.random() < 0.5)})
    assert policy._difficulty.err[0] < policy._difficulty.err[1:].min()
    assert not policy._applied.any()


def _stats_fed(x: np.ndarray, y: np.ndarray) -> ArmStatistics:
    stats = ArmStatistics(x.shape[1] - 1, context_ridge=100.0, context_ridges=(1e6, 100.0))
    lam, mu0, sigma0 = np.ones(3), np.array([0.5, 0.0, 0.0]), np.array([0.5, 1e-3, 1.0])
    for _ in range(2):
        stats.append(lam, mu0, sigma0)
    for i in range(len(x)):
        stats.update(i % 2, x[i], y[i])
    return stats


def test_shift_quality_is_exact_from_the_sums():
    """Moving the sums by delta equals having learned y - x.delta from the start (the
    candidates' prequential errors aside: they are scored as they came)."""
    rng = np.random.default_rng(2)
    x = np.c_[rng.standard_normal((300, 4)), np.ones(300)]
    y = np.c_[rng.random(300), rng.random(300), rng.random(300)]
    delta = np.array([0.3, -0.1, 0.05, 0.2, -0.07])
    moved = _stats_fed(x, y)
    moved.shift_quality(delta)
    shifted = y.copy()
    shifted[:, 0] -= x @ delta
    direct = _stats_fed(x, shifted)
    direct.sel_err[:] = moved.sel_err
    direct.refresh()
    for name in ("b_data", "srr", "theta", "sel_theta", "sigma2"):
        assert getattr(moved, name) == pytest.approx(getattr(direct, name), abs=1e-9), name


def _fed(seed: int = 3, n: int = 300) -> SelectiveThompson:
    policy = SelectiveThompson(DIM, seed=seed, shared_difficulty=True, drift_delta=None,
                               epsilon=0.05)
    policy.add_arm("strong")
    policy.add_arm("weak")
    x, q, _ = _stream(seed, n)
    for t in range(n):
        k = t % 3 == 0
        policy.update(policy.arms[k], x[t], {"quality": q[t, int(k)]})
    return policy


def test_difficulty_same_seed_same_decisions():
    one, two = _fed(), _fed()
    assert one._applied.any()
    x, q, _ = _stream(11, 100)
    for t in range(100):
        d1, d2 = one.decide(x[t]), two.decide(x[t])
        assert (d1.arm, d1.propensity) == (d2.arm, d2.propensity)
        for p in (one, two):
            p.update(d1.arm, x[t], {"quality": q[t, p.arms.index(d1.arm)]})
    assert np.array_equal(one._applied, two._applied)


def test_predictions_add_the_shared_difficulty():
    policy = _fed()
    x = _stream(12, 1)[0][0]
    xb = np.r_[x, 1.0]
    predicted = policy.predict(x)
    for k, name in enumerate(policy.arms):
        own = float(policy._stats.theta[k, 0] @ xb)
        assert predicted[name].quality == pytest.approx(own + xb @ policy._applied,
                                                        abs=1e-12)


@pytest.mark.parametrize("derived", [True, False])
def test_difficulty_restore_round_trip_identical_decisions(derived):
    policy = _fed()
    restored = Policy.from_bytes(policy.to_bytes(derived=derived))
    assert restored.config.shared_difficulty is True
    assert np.array_equal(restored._applied, policy._applied)
    assert np.array_equal(restored._difficulty.err, policy._difficulty.err)
    x, q, _ = _stream(13, 50)
    for t in range(50):
        d1, d2 = policy.decide(x[t]), restored.decide(x[t])
        assert d1.arm == d2.arm
        assert d1.propensity == pytest.approx(d2.propensity, abs=1e-9)
        assert d1.scores == pytest.approx(d2.scores, abs=1e-9)
        for p in (policy, restored):
            p.update(d1.arm, x[t], {"quality": q[t, p.arms.index(d1.arm)]})
    assert restored._applied == pytest.approx(policy._applied, abs=1e-9)


def test_difficulty_merge_adds_sums_and_rebases_arms():
    """After a merge the difficulty's sums are both replicas', and every arm's quality
    sums are of quality minus the merged coefficients, exactly."""
    left, right = _fed(seed=3, n=300), _fed(seed=6, n=200)
    assert not np.array_equal(left._applied, right._applied)
    xx = (ArmSums.of(left._stats, left._applied).xx
          + ArmSums.of(right._stats, right._applied).xx)
    err = left._difficulty.err + right._difficulty.err
    raw = {}
    for policy in (left, right):  # each arm's sum of x * quality, before any shift
        for k, _ in enumerate(policy.arms):
            a = policy._stats.s_data[k]
            b = policy._stats.b_data[k, 0] + a @ policy._applied
            raw[k] = raw.get(k, 0.0) + b
    left.merge(right)
    assert ArmSums.of(left._stats, left._applied).xx == pytest.approx(xx, abs=1e-9)
    assert left._difficulty.err == pytest.approx(err, abs=1e-12)
    assert np.array_equal(left._applied, left._difficulty.coefficients(
        ArmSums.of(left._stats, left._applied)))
    for k, _ in enumerate(left.arms):
        expected = raw[k] - left._stats.s_data[k] @ left._applied
        assert left._stats.b_data[k, 0] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("value", ["yes", 1, None, 0.0])
def test_bad_shared_difficulty_raises_naming_field(value):
    with pytest.raises(InvalidInputError) as err:
        SelectiveThompson(DIM, shared_difficulty=value)
    assert err.value.field == "shared_difficulty"
    assert "shared_difficulty" in str(err.value)


def _slope_stream(policy: SelectiveThompson, slope: float, hours: tuple[float, float],
                  seed: int, n: int = 1500) -> None:
    """Both arms' quality 0.45 + slope * x0 (+ noise), arm a 0.1 better, outcomes spread
    over ``hours`` (their time stamps)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (n, 4))
    q = np.clip(0.45 + slope * x[:, 0] + 0.03 * rng.standard_normal(n), 0.0, 0.9)
    for t, when in enumerate(np.linspace(*hours, n) * 3600.0):
        arm = "ab"[t % 2]
        policy.update(arm, x[t], {"quality": float(q[t] + 0.1 * (arm == "a"))},
                      now=float(when))


@pytest.mark.parametrize("half_life", [None, 1.0])
def test_difficulty_forgets_with_the_arms(half_life):
    """The shared slope flips after 10 hours. With half_life_hours 1 the difficulty's
    sums are the arms' decayed ones: it follows the new slope (-0.3). Without
    forgetting it is the mean of both periods (~0)."""
    policy = SelectiveThompson(4, seed=0, shared_difficulty=True, drift_delta=None,
                               half_life_hours=half_life)
    policy.add_arm("a")
    policy.add_arm("b")
    _slope_stream(policy, 0.3, (0.0, 10.0), seed=1)
    assert policy._applied[0] == pytest.approx(0.3, abs=0.03)
    _slope_stream(policy, -0.3, (10.0, 20.0), seed=2)
    if half_life is None:
        assert abs(policy._applied[0]) < 0.05
    else:
        assert policy._applied[0] == pytest.approx(-0.3, abs=0.03)
        # The arms' sums are the difficulty's: about 1 / ln 2 hours of outcomes.
        sums = ArmSums.of(policy._stats, policy._applied)
        assert sums.n.sum() == pytest.approx(float(policy._stats.weight[:, 0].sum()))
        assert sums.n.sum() < 0.2 * policy._difficulty.seen


def test_difficulty_scores_decay_by_the_share_the_arms_forgot():
    """The candidates' prequential scores forget with the arms: a decay to a quarter
    of the weight scales them by a quarter (then the next outcome's error is added)."""
    policy = SelectiveThompson(4, seed=0, shared_difficulty=True, drift_delta=None,
                               half_life_hours=1.0)
    policy.add_arm("a")
    policy.add_arm("b")
    _slope_stream(policy, 0.3, (0.0, 0.0), seed=1, n=200)
    before = policy._difficulty.err.copy()
    policy.decay(7200.0)  # two half-lives
    x = np.zeros(4)
    policy.update("a", x, {"quality": float(policy.predict(x)["a"].quality)}, now=7200.0)
    # The outcome is the arm's own prediction: its error against every candidate is the
    # deviation of that prediction from the arm's mean, the same small number.
    assert policy._difficulty.err == pytest.approx(0.25 * before, rel=0.02)


@pytest.mark.parametrize("estimates", [[-0.01, 0.01], [float("inf"), 0.01], [0.01]])
def test_refused_batch_update_teaches_the_difficulty_nothing(estimates):
    # A batch refused for its cost estimates leaves every sum as it was, the shared
    # difficulty's included: a caller's retry counts those outcomes once.
    policy = _fed()
    before = policy.to_bytes()
    x, q, _ = _stream(9, 2)
    outcomes = [{"quality": float(q[t, 0]), "cost_usd": 0.01} for t in range(2)]
    with pytest.raises(InvalidInputError):
        policy.update_batch(["strong", "weak"], x, outcomes, cost_estimates=estimates)
    assert policy.to_bytes() == before


def test_difficulty_state_saved_with_its_own_sums_loads():
    """A state saved before the sums were the arms' (its own xx, xy and rows) loads:
    the scores are kept and the fit is solved again from the arms' sums."""
    policy = _fed()
    sums = ArmSums.of(policy._stats, policy._applied)
    state = policy._difficulty.to_json()
    old = {"xx": sums.xx.tolist(), "xy": sums.xy.tolist(), "err": state["err"],
           "arms": {}, "fits": state["fits"], "fitted_at": 300.0}
    loaded = SharedDifficulty(policy._difficulty.ridges)
    loaded.load(old)
    assert np.array_equal(loaded.err, policy._difficulty.err)
    fresh = SharedDifficulty(policy._difficulty.ridges)
    fresh.err = policy._difficulty.err.copy()
    assert loaded._fits is None
    assert loaded.coefficients(sums) == pytest.approx(fresh.coefficients(sums), abs=1e-12)
    assert loaded.coefficients(sums).any()


def test_arm_sums_read_slice_by_slice_match_the_stacked_sums():
    """The sums summed arm by arm equal the stacked (K, D, D) formula they replaced
    (benchmarks/difficulty_update_speed.py times both) to rounding, with one arm's
    quality head out of the group (its own a_data) and the difficulty applied."""
    policy = _fed()
    policy._stats._split(1, np.array([True, False, False]))
    x, q, _ = _stream(5, 60)
    for t in range(60):
        policy.update(policy.arms[t % 2], x[t], {"quality": q[t, t % 2]})
    assert not policy._stats.group[1, 0] and policy._stats.group[0, 0]
    assert policy._applied.any()
    got = ArmSums.of(policy._stats, policy._applied)
    want = stacked_arm_sums(ArmSums, policy._stats, policy._applied)
    for name in ("xx", "xy", "n", "sy", "sx"):
        assert getattr(got, name) == pytest.approx(getattr(want, name), abs=1e-9), name


def test_a_level_moves_the_difficulty_scores_by_nothing():
    """Quality 0.5 higher on every outcome, learned against a level 0.5 higher (held
    still: horizon 1e12), leaves the arms' sums, and so the candidates' scores, as
    they were: the scores are of quality minus the level, as the sums are."""
    x, q, _ = _stream(3, 300)
    policies = []
    for level in (0.0, 0.5):
        policy = SelectiveThompson(DIM, seed=3, shared_difficulty=True, drift_delta=None,
                                   level_horizon=1e12)
        policy.add_arm("strong")
        policy.add_arm("weak")
        policy._level = level
        for t in range(300):
            k = int(t % 3 == 0)
            policy.update(policy.arms[k], x[t], {"quality": level + 0.5 * q[t, k]})
        policies.append(policy)
    low, high = policies
    assert high._level == pytest.approx(0.5, abs=1e-9)
    assert high._difficulty.err == pytest.approx(low._difficulty.err, rel=1e-6)
    assert high._applied == pytest.approx(low._applied, abs=1e-6)
