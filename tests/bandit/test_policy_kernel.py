"""The compiled kernels of the single-context hot path (bandit/_policy_kernel.py) against
the numpy reference they replace: same statistics, predictions and propensities to 1e-9
over random streams, and the same decisions from the same seed."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import ndtr

from bandit import ArmPrior, LinearThompson, LinUCB, Preferences, PriceList, SelectiveThompson
from bandit._policy_kernel import normal_cdf, quality_ceiling, thompson_propensities, width_matrix
from bandit.stats import FLOAT32_INVERSE_DIM, FLOAT32_WIDTH_BATCH, FUSED_BATCH, ArmStatistics
from bandit.thompson import _PRUNE_SIGMAS

PREFS = Preferences(quality=1.0, cost=20.0, latency=0.1)
CONFIGS = [{}, {"context_ridges": (1.0, 100.0)}, {"half_life_hours": 1.0},
           {"refresh_every": 7}, {"tag_dims": 2, "context_ridges": (1e6, 1.0)}]


def pair(cls, d: int, **params):
    """The same policy twice, one with the compiled kernels and one on numpy alone."""
    policies = []
    for compiled in (True, False):
        policy = cls(d, seed=3, epsilon=0.05, drift_delta=None, **params)
        for j in range(5):
            policy.add_arm(f"m{j}", ArmPrior(quality=0.7, cost_usd=0.001) if j == 2 else None)
        policy._stats.compiled = compiled
        policies.append(policy)
    return policies


def predict_both(stats: ArmStatistics, xb: np.ndarray, c: np.ndarray, w: np.ndarray):
    """``stats.predict`` compiled, then on numpy alone (the reference)."""
    got = stats.predict(xb, None, c, w)
    stats.compiled = False
    try:
        return got, stats.predict(xb, None, c, w)
    finally:
        stats.compiled = True


def outcome(rng: np.random.Generator, t: int, partial: bool) -> dict[str, float]:
    out = {"quality": float(rng.random()), "cost_usd": 0.001 * (1 + t % 5),
           "latency_ms": 200.0 + 10 * (t % 7)}
    if partial and t % 4 == 0:
        del out["quality"]  # splits the arm's head group (then its own heads' steps too)
    return out


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson, SelectiveThompson])
@pytest.mark.parametrize("params", CONFIGS)
@pytest.mark.parametrize("partial", [False, True])
def test_compiled_stream_matches_numpy_reference(cls, params, partial):
    compare_stream(cls, params, partial)


@pytest.mark.parametrize("partial", [False, True])
def test_compiled_stream_matches_numpy_with_shared_difficulty(partial):
    # The difficulty shifts every arm's prediction by x.beta: a compiled decide that
    # read the level alone would rank the arms on the wrong scale.
    compare_stream(SelectiveThompson, {"shared_difficulty": True}, partial)


def compare_stream(cls, params, partial):
    compiled, reference = pair(cls, 6, **params)
    rng = np.random.default_rng(17)
    for t in range(300):
        x = rng.standard_normal(6) / 2
        got = compiled.decide(x, PREFS)
        want = reference.decide(x, PREFS)
        assert got.arm == want.arm  # same seed, same decisions
        assert type(got.explored) is bool and type(got.propensity) is float  # JSON
        assert got.propensity == pytest.approx(want.propensity, abs=1e-9)
        for name, p in want.predictions.items():
            np.testing.assert_allclose(tuple(got.predictions[name]), tuple(p),
                                       rtol=1e-9, atol=1e-9)
        y = outcome(rng, t, partial)
        now = 60.0 * t
        compiled.update(got.arm, x, y, now=now)
        reference.update(want.arm, x, y, now=now)
    for name in ArmStatistics.ARRAYS:
        np.testing.assert_allclose(getattr(compiled._stats, name),
                                   getattr(reference._stats, name), rtol=1e-9, atol=1e-9,
                                   err_msg=name)
    assert compiled.version == reference.version


def test_update_kernel_changes_only_the_chosen_arm():
    compiled, _ = pair(LinUCB, 4)
    compiled.update("m0", np.ones(4) / 2, {"quality": 1.0, "cost_usd": 0.0, "latency_ms": 1.0})
    before = {name: getattr(compiled._stats, name).copy() for name in ArmStatistics.ARRAYS}
    compiled.update("m3", np.full(4, 0.3), {"quality": 0.2, "cost_usd": 0.01,
                                             "latency_ms": 900.0})
    for name in ArmStatistics.ARRAYS:
        after = getattr(compiled._stats, name)
        np.testing.assert_array_equal(after[:3], before[name][:3], err_msg=name)
        if name in ("s_inv", "s_data", "theta", "b_data", "srr", "weight", "count"):
            assert not np.array_equal(after[3], before[name][3]), name


def test_kernel_normal_cdf_matches_scipy():
    z = np.linspace(-12.0, 12.0, 400_001)
    np.testing.assert_allclose(normal_cdf(z), ndtr(z), rtol=0, atol=1e-10)


def test_batched_thompson_propensities_match_numpy_with_cold_and_flat_arms():
    compiled, reference = pair(LinearThompson, 5, cold_start_pulls=3)
    rng = np.random.default_rng(8)
    for t in range(40):  # m4 stays cold (never updated): the cold-start branch
        x, y = rng.standard_normal(5) / 2, outcome(rng, t, False)
        for policy in (compiled, reference):
            policy.update(f"m{t % 4}", x, y)
    rows = rng.standard_normal((300, 5)) / 2
    got = compiled.decide_batch(rows, PREFS)
    want = reference.decide_batch(rows, PREFS)
    np.testing.assert_array_equal(got.choices, want.choices)
    np.testing.assert_allclose(got.propensities, want.propensities, rtol=0, atol=1e-9)
    names, p_got = compiled.probabilities(rows[:50], PREFS)
    _, p_want = reference.probabilities(rows[:50], PREFS)
    np.testing.assert_allclose(p_got, p_want, rtol=0, atol=1e-9)
    # The midpoint rule on 64 nodes errs by ~1e-3 (LinearThompsonConfig).
    np.testing.assert_allclose(p_got.sum(axis=1), 1.0, atol=2e-3)


def test_thompson_kernel_step_functions_and_unreachable_arms():
    utility = np.array([[0.5, 0.5, 0.2, -np.inf], [0.1, 0.3, 0.3, 0.0]])
    s = np.array([[0.0, 0.0, 0.1, 0.1], [0.2, 0.0, 0.1, 0.3]])
    quantiles = ndtr_inverse_nodes(64)
    for j in range(4):
        choices = np.array([j, j])
        got = thompson_propensities(utility, s, choices, quantiles, _PRUNE_SIGMAS)
        ref = LinearThompson(1, scale=1.0, propensity_nodes=64)
        ref._stats.compiled = False
        want = ref._main_propensity(utility, s, choices, np.full_like(utility, np.inf))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    # A tie of two flat arms is a coin flip, times the third arm staying below 0.5
    # (3 standard deviations); an unreachable chosen arm never wins.
    got = thompson_propensities(utility, s, np.array([0, 1]), quantiles, _PRUNE_SIGMAS)
    assert got[0] == pytest.approx(0.5 * ndtr(3.0), abs=1e-9)
    assert thompson_propensities(utility, s, np.array([3, 3]), quantiles,
                                 _PRUNE_SIGMAS)[0] == 0.0


def ndtr_inverse_nodes(nodes: int) -> np.ndarray:
    from scipy.special import ndtri

    return ndtri((np.arange(nodes) + 0.5) / nodes)


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson, SelectiveThompson])
def test_large_dimension_width_from_float32_copy_tracks_float64(cls):
    d = FLOAT32_INVERSE_DIM  # D = d + 1 features: the float32 copy is used
    compiled, reference = pair(cls, d, refresh_every=5)
    rng = np.random.default_rng(4)
    for t in range(40):
        x = rng.standard_normal(d) / np.sqrt(d)
        got = compiled.decide_batch(x, PREFS, explore=True)
        want = reference.decide_batch(x, PREFS, explore=True)
        # Stored in float32, summed in float64: the width within 1e-6 of float64's.
        np.testing.assert_allclose(got.uncertainty, want.uncertainty, rtol=1e-6)
        np.testing.assert_allclose(got.utility, want.utility, rtol=1e-9, atol=1e-9)
        y = outcome(rng, t, partial=False)
        if t % 5 == 4:
            del y["quality"]  # m4's heads split: its own heads' steps too
        compiled.update(f"m{t % 5}", x, y)
        reference.update(f"m{t % 5}", x, y)
    stats = compiled._stats
    copy = stats._copies32["s_inv"]
    assert copy[0] is stats.s_inv  # the decides read the copy
    compiled.decide(x, PREFS)  # brings the arms a refresh made stale
    if stats.selecting:  # (arm m2's split heads keep its decides off the q_inv copy)
        stats._copy32("q_inv")
    k = int(np.argmin(stats.updates[:4]))  # an arm of the kernel this update won't refresh
    compiled.update(f"m{k}", x, {"quality": 0.5, "cost_usd": 0.001, "latency_ms": 100.0})
    assert not copy[2][k]  # the kernel wrote the copy: not stale, and equal
    np.testing.assert_allclose(copy[1][k], stats.s_inv[k], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(stats._copy32("s_inv"), stats.s_inv, rtol=1e-6, atol=1e-12)
    if stats.selecting:  # the selected candidates' inverses have theirs
        q = stats._copies32["q_inv"]
        assert q[0] is stats.q_inv and not q[2][k]
        np.testing.assert_allclose(q[1][k], stats.q_inv[k], rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(stats._copy32("q_inv"), stats.q_inv, rtol=1e-6,
                                   atol=1e-12)
    compiled.add_arm("new")  # a new s_inv array: a new copy
    assert compiled.decide(x, PREFS).predictions["new"].uncertainty > 0
    assert stats._copies32["s_inv"][0] is stats.s_inv


def test_quality_ceiling_matches_numpy_bit_for_bit():
    rng = np.random.default_rng(5)
    utility = rng.standard_normal((7, 4))
    means = rng.uniform(-0.5, 1.5, (7, 4, 3))  # quality above 1 adds nothing
    means[2, 1, 0] = np.nan
    want = utility + 2.5 * np.maximum(1.0 - means[:, :, 0], 0.0)
    np.testing.assert_array_equal(quality_ceiling(utility, means, 2.5), want)
    # A column selection (not contiguous) gives the same.
    np.testing.assert_array_equal(quality_ceiling(utility[:, ::2], means[:, ::2], 2.5),
                                  want[:, ::2])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("selecting", [False, True])
def test_width_matrix_matches_numpy_bit_for_bit(dtype, selecting):
    rng = np.random.default_rng(31)
    k, g, d = 4, 3, 7
    inv = rng.standard_normal((k, d, d))
    sel_inv = rng.standard_normal((k, g, d, d))
    sel = np.array([2, 0, 1, 2], dtype=np.intp)
    c, c_sel = rng.random(k), rng.random((k, 3))[:, 0]  # a strided column, as predict's
    want = c[:, None, None] * inv
    if selecting:
        want += c_sel[:, None, None] * sel_inv[np.arange(k), sel]
    want = want.transpose(1, 0, 2).reshape(d, k * d).astype(dtype)
    got = np.empty((d, k * d), dtype=dtype)
    width_matrix(inv, c, sel_inv if selecting else np.zeros((0, 0, 0, 0)), sel, c_sel, got)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("cls", [LinearThompson, SelectiveThompson])
@pytest.mark.parametrize("partial", [False, True])
def test_batch_path_widths_match_numpy_bit_for_bit(cls, partial):
    """The batch path (more than FUSED_BATCH contexts) builds its combined matrices in
    one compiled pass (``width_matrix``) unless a head outside its arm's group weighs
    in (then in numpy; with selection the split quality head reads its candidate's
    inverse: still compiled): on the same statistics, the same widths to the bit,
    float64 and float32 (from FLOAT32_WIDTH_BATCH rows)."""
    policy, _ = pair(cls, 6)
    policy.remove_arm("m2")  # no prior: every head grouped unless ``partial``
    rng = np.random.default_rng(29)
    for t in range(80):
        policy.update(f"m{t % 4 if t % 4 != 2 else 4}", rng.standard_normal(6) / 2,
                      outcome(rng, t, partial))
    stats = policy._stats
    assert stats._all_grouped() is not partial
    w = PREFS.head_weights()
    c = (w * w) * stats.sigma2
    for n in (FUSED_BATCH + 1, FLOAT32_WIDTH_BATCH):
        xb = policy._features(rng.standard_normal((n, 6)) / 2)
        got, want = predict_both(stats, xb, c, w)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        assert (got[2] > 0).all()


def test_large_dimension_selected_inverses_width_from_float32_copy():
    d = FLOAT32_INVERSE_DIM
    policies = []
    for compiled in (True, False):
        policy = SelectiveThompson(d, seed=3, drift_delta=None, refresh_every=4)
        for j in range(3):
            policy.add_arm(f"m{j}")  # no priors: every head grouped, the fused kernel
        policy._stats.compiled = compiled
        policies.append(policy)
    rng = np.random.default_rng(8)
    for t in range(12):
        x = rng.standard_normal(d) / np.sqrt(d)
        got, want = (p.decide_batch(x, PREFS) for p in policies)
        np.testing.assert_allclose(got.uncertainty, want.uncertainty, rtol=1e-6)
        y = outcome(rng, t, partial=False)
        for p in policies:
            p.update(f"m{t % 3}", x, y)
    stats = policies[0]._stats
    assert stats._copies32["q_inv"][0] is stats.q_inv  # the decides read the copy
    np.testing.assert_allclose(stats._copy32("q_inv"), stats.q_inv, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("cls", [LinearThompson, SelectiveThompson])
def test_small_batch_fused_kernel_matches_numpy_batch_path(cls):
    compiled, reference = pair(cls, 6)
    for policy in (compiled, reference):  # every head grouped: the fused kernel's case
        policy.remove_arm("m2")
    rng = np.random.default_rng(23)
    for t in range(60):
        x = rng.standard_normal(6) / 2
        y = outcome(rng, t, partial=False)
        for policy in (compiled, reference):
            policy.update(f"m{t % 4 if t % 4 != 2 else 4}", x, y)
    for n in range(1, FUSED_BATCH + 2):  # the last one takes the batch path in both
        rows = rng.standard_normal((n, 6)) / 2
        got, want = (p.decide_batch(rows, PREFS) for p in (compiled, reference))
        np.testing.assert_array_equal(got.choices, want.choices)
        for name in ("means", "utility", "uncertainty", "propensities"):
            np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=1e-9,
                                       atol=1e-9, err_msg=name)


@pytest.mark.parametrize("cls,params", [(LinUCB, {}), (LinearThompson, {}),
                                        (SelectiveThompson, {}),
                                        (SelectiveThompson, {"level_horizon": 20.0}),
                                        (LinUCB, {"bounded_optimism": False})])
def test_fused_decide_matches_numpy_with_candidates_prices_and_batches(cls, params):
    """The whole decide in one compiled call (``_policy_kernel.decide_rows``) against
    the numpy path: candidate subsets, cost estimates, a few rows at once, propensities
    off; same draws, same choices, the same numbers to 1e-9."""
    compiled, reference = pair(cls, 6, **params)
    fused = []
    decide_fused = compiled._decide_fused
    compiled._decide_fused = lambda *a: fused.append(decide_fused(*a)) or fused[-1]
    rng = np.random.default_rng(5)
    names = [f"m{j}" for j in range(5)]
    prices = PriceList(names, [1.0, 2.0, 0.5, 3.0, 1.5], [2.0, 4.0, 1.0, 6.0, 3.0], 100.0)
    for t in range(250):
        x, y = rng.standard_normal(6) / 2, outcome(rng, t, False)
        for policy in (compiled, reference):
            policy.update(names[t % 5], x, y, cost_estimate=0.001)
        n = 1 + t % 3
        rows = rng.standard_normal((n, 6)) / 2 if n > 1 else x
        candidates = None if t % 4 == 0 else sorted(rng.choice(names, 1 + t % 5,
                                                                replace=False))
        chosen = candidates or names
        estimate = [None, prices.estimate([300.0] * n),
                    rng.uniform(0, 0.01, (n, len(chosen))), None][t % 4]
        if t % 4 == 1 and candidates is not None:
            estimate = PriceList(chosen, [1.0] * len(chosen), [2.0] * len(chosen),
                                 50.0).estimate([400.0] * n)
        kwargs = {"cost_estimate": estimate, "propensities": t % 7 != 0}
        got = compiled.decide_batch(rows, PREFS, candidates, **kwargs)
        want = reference.decide_batch(rows, PREFS, candidates, **kwargs)
        assert got.arms == want.arms
        np.testing.assert_array_equal(got.choices, want.choices)
        np.testing.assert_array_equal(got.explored, want.explored)
        for field in ("propensities", "means", "utility", "uncertainty", "scores"):
            np.testing.assert_allclose(getattr(got, field), getattr(want, field),
                                       rtol=1e-9, atol=1e-9, err_msg=field)
    assert sum(r is not None for r in fused) > 200  # the kernel decided (not a fallback)


@pytest.mark.parametrize("cls", [LinUCB, SelectiveThompson])
@pytest.mark.parametrize("partial", [False, True])
def test_few_contexts_width_matches_one_context_at_a_time(cls, partial):
    """The exploration width of 2..127 contexts (the combined-matrix batch path) equals
    the one-context numpy path's, row by row: with a selected quality head, and with
    heads split from their groups (``partial``)."""
    _, reference = pair(cls, 6)
    rng = np.random.default_rng(29)
    for t in range(80):
        x = rng.standard_normal(6) / 2
        reference.update(f"m{t % 5}", x, outcome(rng, t, partial))
    stats = reference._stats
    assert partial != stats._all_grouped()
    c = PREFS.validated().head_weights() ** 2 * stats.sigma2
    w = PREFS.validated().head_weights()
    for n in (2, FUSED_BATCH + 1, 127):
        xb = rng.standard_normal((n, stats.n_features)) / 2
        means, utility, std = stats.predict(xb, None, c, w)
        rows = [stats.predict(xb[i:i + 1], None, c, w) for i in range(n)]
        np.testing.assert_allclose(std, np.vstack([r[2] for r in rows]), rtol=1e-12)
        np.testing.assert_allclose(utility, np.vstack([r[1] for r in rows]), rtol=1e-12)
        assert std.shape == (n, 5) and (std > 0).all()


def test_shared_ridge_candidate_follows_a_changed_tag_ridge():
    """The quality candidate with the shared group's ridge reads and copies the shared
    inverse in the compiled kernels (``ArmStatistics.shared_candidate``); once a learned
    tag prior gives the with-tags candidates another ridge it is no longer that matrix,
    and the kernels must stop using it for it: predictions and sums stay the numpy
    reference's."""
    policies = []
    for compiled in (True, False):
        policy = SelectiveThompson(6, seed=5, drift_delta=None, tag_dims=2,
                                   tag_prior="learned")
        for j in range(3):
            policy.add_arm(f"m{j}")
        policy._stats.compiled = compiled
        policies.append(policy)
    stats = policies[0]._stats
    assert stats.shared_candidate >= 0  # (100 on the text, tag_ridge on the tags)
    rng = np.random.default_rng(4)

    def stream(steps: int) -> None:
        for _ in range(steps):
            x = rng.standard_normal(6) / 2
            x[4:] = np.eye(2)[rng.integers(2)]
            got, want = (p.decide_batch(x, PREFS) for p in policies)
            np.testing.assert_array_equal(got.choices, want.choices)
            np.testing.assert_allclose(got.uncertainty, want.uncertainty, rtol=1e-9,
                                       atol=1e-12)
            arm = f"m{int(rng.integers(3))}"
            y = {"quality": float(np.clip(0.5 + 0.4 * x[0] + 0.3 * x[4], 0, 1)),
                 "cost_usd": 0.001, "latency_ms": 300.0}
            for p in policies:
                p.update(arm, x, y)

    stream(60)
    assert (stats.selected() == stats.shared_candidate).any()  # the case is exercised
    for p in policies:
        p._learn_tag_prior(10.0)  # as a restore of a learned tag ridge does
    assert stats.shared_candidate == -1
    stream(60)
    for name in ("sel_inv", "sel_theta", "theta", "sigma2"):
        np.testing.assert_allclose(getattr(policies[0]._stats, name),
                                   getattr(policies[1]._stats, name), rtol=1e-9,
                                   atol=1e-12, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_quadratic_form_from_the_lower_triangle_matches_the_full_form(dtype):
    """The widths' ``x^T P x`` read four rows of P's lower triangle at a time: every
    remainder of D mod 4 (and D < 4), float64 and the float32 copies, against numpy's
    full form; the strict upper triangle is NaN, so a read of it shows."""
    from bandit._policy_kernel import _quadratic

    rng = np.random.default_rng(3)
    for d in range(1, 14):
        a = rng.standard_normal((d, d))
        p = np.linalg.inv(a @ a.T + d * np.eye(d)).astype(dtype)
        x = rng.standard_normal(d)
        want = x @ p.astype(np.float64) @ x
        p[np.triu_indices(d, 1)] = np.nan
        assert _quadratic(p, x) == pytest.approx(want, rel=1e-12, abs=0), d
