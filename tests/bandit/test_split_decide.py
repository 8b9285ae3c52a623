"""The compiled decide of arms whose heads are split off their group (outcomes reported in
pieces: a gateway reports cost and latency when the response ends and the quality later)
against the numpy path: the same choices, propensities and predictions (widths
included), and the generator in the same state after them. From FLOAT32_INVERSE_DIM
features it reads float32 copies of the inverses (split heads' own included): against
float64 within the documented 1e-6, and against the numpy path on the same inverses
rounded to float32 (what the copies hold) to the order of its sums."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from bandit import LinearThompson, LinUCB, Preferences, PriceList, SelectiveThompson
from bandit.stats import ALL_GROUPED, FLOAT32_INVERSE_DIM, FUSED_BATCH
from tests.bandit.test_partial_update import FULL, piece
from tests.bandit.test_policy_kernel import PREFS, pair, predict_both

GATEWAY = (("cost_usd", "latency_ms"), ("quality",))  # each call: two pieces
MIXED = (FULL, ("quality",), ("cost_usd", "latency_ms"), ("latency_ms",))
POLICIES = [(LinUCB, {}), (LinearThompson, {}), (SelectiveThompson, {}),
            (LinUCB, {"context_ridges": (1.0, 100.0)}),
            (LinearThompson, {"half_life_hours": 1.0, "decay_interval_s": 0.0})]


def fed(cls, params: dict, d: int, pieces: tuple, n: int = 200):
    """``pair`` fed the same stream of outcome pieces (every arm warm)."""
    compiled, reference = pair(cls, d, **params)
    rng = np.random.default_rng(41)
    for t in range(n):
        x = rng.standard_normal(d) / np.sqrt(d)
        y = piece(rng, t, pieces)
        for policy in (compiled, reference):
            policy.update(f"m{t % 5}", x, y, time=float(t))
    return compiled, reference, rng


def assert_same(compiled, reference, rng, rows: int = 16, prefs=PREFS, tol: float | None = None,
                **kwargs) -> None:
    if tol is None:
        tol = 1e-9 if compiled.dim + 1 < FLOAT32_INVERSE_DIM else 1e-6
    for x in rng.standard_normal((rows, compiled.dim)) / np.sqrt(compiled.dim):
        a = compiled.decide(x, prefs, **kwargs)
        b = reference.decide(x, prefs, **kwargs)
        assert (a.arm, a.explored) == (b.arm, b.explored)
        # (Thompson's: the kernel's normal CDF table is within 2e-11 of scipy's)
        assert a.propensity == pytest.approx(b.propensity, rel=0, abs=max(tol, 1e-9))
        assert list(a.predictions) == list(b.predictions)
        for name, p in a.predictions.items():  # the width ("uncertainty") included
            np.testing.assert_allclose(p, b.predictions[name], rtol=tol, atol=tol)
    # The same draws in the same order: the generators are in the same state.
    assert compiled._rng.random() == reference._rng.random()


def assert_fused_split(policy) -> None:
    """The compiled decide applies, and some head is split off its group."""
    plan = policy._fused_plan()
    assert plan.rule is not None and plan.n_cold == 0
    assert plan.group is not ALL_GROUPED and not plan.group.all()


@pytest.mark.parametrize("cls,params", POLICIES)
@pytest.mark.parametrize("pieces", [GATEWAY, MIXED], ids=["gateway", "mixed"])
def test_split_heads_decide_compiled_as_numpy(cls, params, pieces):
    compiled, reference, rng = fed(cls, params, 6, pieces)
    assert_fused_split(compiled)
    calls = []
    kernel = compiled._decide_fused
    compiled._decide_fused = lambda *a, **k: calls.append(kernel(*a, **k)) or calls[-1]
    assert_same(compiled, reference, rng)
    assert_same(compiled, reference, rng, prefs=Preferences(quality=1.0, cost=0.0,
                                                            latency=3.0))
    assert len(calls) == 32 and all(c is not None for c in calls)  # all compiled


@pytest.mark.parametrize("cls", [LinUCB, SelectiveThompson])
def test_split_heads_with_candidates_prices_and_batches(cls):
    """Candidate subsets, cost estimates (the cost head's width left out) and a few
    contexts at once (``decide_rows``) on split heads."""
    compiled, reference, rng = fed(cls, {}, 6, GATEWAY)
    assert_fused_split(compiled)
    names = [f"m{j}" for j in range(5)]
    prices = PriceList(names, [1.0, 2.0, 0.5, 3.0, 1.5], [2.0, 4.0, 1.0, 6.0, 3.0], 100.0)
    for t in range(24):
        n = 1 + t % 3
        rows = rng.standard_normal((n, 6)) / 2
        candidates = None if t % 2 else sorted(rng.choice(names, 2 + t % 4, replace=False))
        estimate = prices.estimate([300.0] * n) if t % 3 == 0 and candidates is None else None
        got = compiled.decide_batch(rows, PREFS, candidates, cost_estimate=estimate)
        want = reference.decide_batch(rows, PREFS, candidates, cost_estimate=estimate)
        np.testing.assert_array_equal(got.choices, want.choices)
        for field in ("propensities", "means", "utility", "uncertainty", "scores"):
            np.testing.assert_allclose(getattr(got, field), getattr(want, field),
                                       rtol=1e-9, atol=1e-9, err_msg=field)


@pytest.mark.parametrize("cls", [LinUCB, SelectiveThompson])
def test_split_heads_large_dimension(cls):
    """From FLOAT32_INVERSE_DIM features the group's, the selected quality candidate's
    and a split head's own inverse are read from their float32 copies: the decide
    within 1e-6 of the float64 numpy path's (that the copies are what is read:
    test_split_heads_decide_reads_float32_copies)."""
    d = FLOAT32_INVERSE_DIM
    compiled, reference, rng = fed(cls, {}, d, GATEWAY, n=160)
    assert_fused_split(compiled)
    assert_same(compiled, reference, rng, rows=6)


# The compiled decide on float32 copies against the numpy path on the same float32
# values (summed in float64 by both): only the order of the sums differs.
F32_TOL = 1e-11


def float32_reference(policy):
    """A copy of ``policy`` on numpy alone whose inverses are rounded to float32: the
    numbers the compiled decide reads from the float32 copies, summed in float64."""
    ref = copy.deepcopy(policy)
    stats = ref._stats
    stats.compiled = False
    stats.q_inv  # noqa: B018 (copies the selected candidates' inverses, then rounded)
    for name in ("s_inv", "a_inv", "sel_inv", "_q_inv"):
        array = getattr(stats, name)
        array[...] = array.astype(np.float32)
    return ref


def assert_reads_float32_copies(policy, rng, rows: int = 4) -> None:
    """The compiled decide equals the float32 reference's, and reads the split heads'
    own inverses from their float32 copy, current (equal to a_inv rounded)."""
    assert_same(policy, float32_reference(policy), rng, rows=rows, tol=F32_TOL)
    stats = policy._stats
    if stats.selecting and stats.group[:, 1:].all():
        # Only quality heads split: they read their candidates' inverses (and copy).
        assert policy._fused_plan().own_inverses is stats.a_inv
        assert "a_inv" not in stats._copies32
        return
    source, copy32, _ = stats._copies32["a_inv"]
    assert source is stats.a_inv and policy._fused_plan().own_inverses is copy32
    split = ~stats.group
    assert split.any()
    np.testing.assert_array_equal(copy32[split], stats.a_inv[split].astype(np.float32))


@pytest.mark.parametrize("cls,params", POLICIES)
@pytest.mark.parametrize("pieces", [GATEWAY, MIXED], ids=["gateway", "mixed"])
def test_split_heads_decide_reads_float32_copies(cls, params, pieces):
    """At d=260 after outcomes in pieces the compiled decide (and predict's, with a
    cold arm) reads every inverse from its float32 copy: the numpy path's decisions
    on the same inverses rounded to float32; within 1e-6 of float64's (above)."""
    d = 260
    compiled, _, rng = fed(cls, params, d, pieces, n=240)
    assert_fused_split(compiled)
    assert_reads_float32_copies(compiled, rng, rows=6)
    compiled.add_arm("new")  # a cold arm among warm ones: predict_width's widths
    assert compiled._fused_plan().n_cold == 1
    assert_same(compiled, float32_reference(compiled), rng, rows=4, tol=F32_TOL)


def kernel_updates(policy, rng, n: int, pieces: tuple) -> None:
    """``n`` updates of outcome pieces, arm by arm in turn; after each, every split
    head's float32 copy that is not marked stale equals its float64 inverse rounded (the
    kernel wrote it row by row from the float64 step's result), and some were."""
    stats, d, names = policy._stats, policy.dim, policy.arms
    checked = 0
    for t in range(n):
        x = rng.standard_normal(d) / np.sqrt(d)
        # (at the reference time: no forgetting step, which refreshes every arm)
        policy.update(names[t % len(names)], x, piece(rng, t, pieces),
                      time=policy.reference_time)
        source, copy32, stale = stats._copies32["a_inv"]
        assert source is stats.a_inv
        fresh = ~stats.group & ~stale
        checked += int(fresh.sum())
        np.testing.assert_array_equal(copy32[fresh], stats.a_inv[fresh].astype(np.float32),
                                      err_msg=f"after update {t}")
    assert checked > 0


@pytest.mark.parametrize("cls", [LinUCB, SelectiveThompson])
def test_split_heads_float32_copy_kept_current(cls):
    """The split heads' float32 copy follows every change of their inverses as the
    group's copy does: the update kernel writes it; a refresh, a numpy update, a split,
    forgetting, a merge mark it stale (copied when a decide reads it); a round trip and
    arms added or removed make a new one."""
    d = 260
    params = {"half_life_hours": 1.0, "decay_interval_s": 0.0, "refresh_every": 9}
    compiled, _, rng = fed(cls, params, d, (FULL,), n=40)
    compiled.remove_arm("m2")  # an arm fewer (its copies follow)
    compiled.update("m0", rng.standard_normal(d) / 16, {"quality": 0.8}, time=50.0)
    assert_reads_float32_copies(compiled, rng)  # m0's cost and latency split: a copy
    # m1 splits after the copy was made: its heads' copies are stale, then copied.
    compiled.update("m1", rng.standard_normal(d) / 16, {"quality": 0.4}, time=51.0)
    assert not compiled._stats.group[1, 1:].any()
    assert_reads_float32_copies(compiled, rng)
    kernel_updates(compiled, rng, 30, GATEWAY)  # refreshes every 9 (stale)
    assert_reads_float32_copies(compiled, rng)
    compiled._stats.compiled = False  # the numpy update marks the copy stale
    kernel_updates(compiled, rng, 4, MIXED)
    compiled._stats.compiled = True
    assert_reads_float32_copies(compiled, rng)
    compiled.decay(compiled.reference_time + 1800.0)  # forgetting: every arm refreshed
    assert_reads_float32_copies(compiled, rng)
    other = copy.deepcopy(compiled)
    kernel_updates(other, rng, 8, GATEWAY)
    compiled.merge(other)
    assert_reads_float32_copies(compiled, rng)
    restored = type(compiled).from_bytes(compiled.to_bytes())
    assert "a_inv" not in restored._stats._copies32
    assert_reads_float32_copies(restored, rng)
    kernel_updates(restored, rng, 8, GATEWAY)
    assert_reads_float32_copies(restored, rng)
    before = restored._stats._copies32["a_inv"][1]
    restored.remove_arm("m0")
    assert_reads_float32_copies(restored, rng)
    assert restored._stats._copies32["a_inv"][1] is not before
    kernel_updates(restored, rng, 8, GATEWAY)
    assert_reads_float32_copies(restored, rng)


@pytest.mark.parametrize("change", ["remove", "add"])
def test_float32_copies_of_replaced_arrays_are_dropped(change):
    """Arms removed or added replace the statistics' arrays: the float32 copies of the
    old ones (a_inv's: 85 MB at d=384, K=16, with the old a_inv it keeps alive) go at
    once, not at the next decide that reads a split head (maybe never)."""
    compiled, _, rng = fed(LinUCB, {}, 260, GATEWAY, n=30)
    assert_reads_float32_copies(compiled, rng)
    stats = compiled._stats
    assert "a_inv" in stats._copies32
    if change == "remove":
        compiled.remove_arm("m0")
    else:
        compiled.add_arm("m9")
    assert all(entry[0] is stats._source(name) for name, entry in stats._copies32.items())
    assert "a_inv" not in stats._copies32
    assert_reads_float32_copies(compiled, rng)


def test_plan_follows_the_first_split():
    """A plan built while every head is grouped is replaced when a piece splits one."""
    compiled, reference, rng = fed(LinUCB, {}, 6, (FULL,), n=60)
    for policy in (compiled, reference):
        policy.remove_arm("m2")  # an arm fewer
    assert compiled._fused_plan().group is ALL_GROUPED
    assert_same(compiled, reference, rng, rows=4)
    x = rng.standard_normal(6) / 2
    for policy in (compiled, reference):
        policy.update("m1", x, {"cost_usd": 0.003, "latency_ms": 250.0})
    assert_fused_split(compiled)
    assert not compiled._fused_plan().group[1, 0]
    for _ in range(20):  # the split quality head learns apart: its width moves
        for policy in (compiled, reference):
            policy.update("m1", x, {"quality": 0.9})
    assert_same(compiled, reference, rng, rows=8)


@pytest.mark.parametrize("cls,params", POLICIES)
def test_split_heads_predict_compiled_as_numpy(cls, params):
    """``ArmStatistics.predict`` of up to FUSED_BATCH contexts (``predict_width``: the
    decides the compiled decide does not take, e.g. with a cold arm among warm ones)."""
    compiled, _, rng = fed(cls, params, 6, MIXED)
    stats = compiled._stats
    assert not stats.group.all()
    w = PREFS.validated().head_weights()
    c = w * w * stats.sigma2
    for n in (1, 2, FUSED_BATCH):
        xb = compiled._features(rng.standard_normal((n, 6)) / 2)
        got, want = predict_both(stats, xb, c, w)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        assert (got[2] > 0).all()


def test_split_heads_with_a_cold_arm():
    """A model added among warm split arms: its cold-start share takes the numpy
    decide, whose widths come from ``predict_width``; the same decisions as numpy."""
    compiled, reference, rng = fed(SelectiveThompson, {}, 6, GATEWAY)
    for policy in (compiled, reference):
        policy.add_arm("new")
    assert compiled._fused_plan().n_cold == 1
    assert_same(compiled, reference, rng, rows=24)


@pytest.mark.parametrize("batch", [False, True])
def test_plan_follows_a_split_whose_update_raised(batch, monkeypatch):
    """An update that splits a head group and then fails (here in the drift watch) still
    makes the compiled decide build its plan again: it reads the split head's own
    inverse, as the numpy path does."""
    compiled, reference, rng = fed(LinUCB, {}, 6, (FULL,), n=60)
    for policy in (compiled, reference):
        policy.remove_arm("m2")
    assert compiled._fused_plan().group is ALL_GROUPED

    def fail(*args, **kwargs):
        raise RuntimeError("drift watch failed")

    x = rng.standard_normal(6) / 2
    for policy in (compiled, reference):
        monkeypatch.setattr(policy, "_watch_drift", fail)
        with pytest.raises(RuntimeError):
            if batch:
                policy.update_batch(["m1"], x[None], [{"quality": 0.9}])
            else:
                policy.update("m1", x, {"quality": 0.9})
    assert not compiled._stats.group[compiled._index["m1"], 1:].any()  # cost, latency split
    assert_fused_split(compiled)
    assert_same(compiled, reference, rng, rows=8)
