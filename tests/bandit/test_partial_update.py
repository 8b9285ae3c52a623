"""The compiled update of outcomes reported in pieces (bandit/_policy_kernel.py
``update_arm``) against the numpy reference of ``ArmStatistics.update``: streams mixing
full, quality-only, cost+latency-only and latency-only outcomes split each arm's head
group (heads with their own inverse beside the group's), and every later update of any
shape takes the kernel. Every array of the statistics, the quality residual, the float32
copies of the inverses and the decisions stay the reference's."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import LinearThompson, LinUCB, SelectiveThompson
from bandit.stats import FLOAT32_INVERSE_DIM
from tests.bandit.test_policy_kernel import PREFS, pair

FULL = ("quality", "cost_usd", "latency_ms")
# The pieces a gateway reports: the whole outcome, the rating alone (later), cost and
# latency when the response ends, latency alone (a failure without usage).
PIECES = (FULL, ("quality",), ("cost_usd", "latency_ms"), ("latency_ms",))
# Arrays compared (q_inv read through its property: the selected candidates' copy).
COMPARED = ("group", "s_data", "s_inv", "a_data", "a_inv", "b_data", "srr", "weight",
            "count", "theta", "sigma2", "sel_err", "sel_inv", "sel_theta", "q_inv",
            "updates")


def piece(rng: np.random.Generator, t: int, pieces: tuple) -> dict[str, float]:
    whole = {"quality": float(rng.random()), "cost_usd": 0.001 * (1 + t % 5),
             "latency_ms": 200.0 + 10 * (t % 7)}
    keys = pieces[int(rng.integers(len(pieces)))]
    return {key: whole[key] for key in keys}


def assert_same_stats(stats, ref, context: str) -> None:
    for name in COMPARED:
        np.testing.assert_allclose(getattr(stats, name), getattr(ref, name), rtol=1e-9,
                                   atol=1e-9, err_msg=f"{name} {context}")
    np.testing.assert_array_equal(stats._sel, ref._sel, err_msg=context)


STREAMS = {
    "mixed": PIECES,
    # the gateway's steady state: cost+latency first, the quality later, per call
    "cost+latency then quality": (("cost_usd", "latency_ms"), ("quality",)),
    "latency then quality": (("latency_ms",), ("quality",), FULL),
}


@pytest.mark.parametrize("d", [6, 64])
@pytest.mark.parametrize("cls,params", [
    (LinUCB, {}), (LinearThompson, {}), (SelectiveThompson, {}),
    (LinUCB, {"context_ridges": (1.0, 100.0)}),
    (LinearThompson, {"half_life_hours": 1.0, "decay_interval_s": 0.0}),
    (SelectiveThompson, {"half_life_hours": 1.0, "decay_interval_s": 0.0,
                         "refresh_every": 9}),
])
@pytest.mark.parametrize("stream", list(STREAMS))
def test_partial_updates_compiled_match_numpy_reference(cls, params, d, stream):
    compiled, reference = pair(cls, d, **params)
    stats, ref = compiled._stats, reference._stats
    forgetting = "half_life_hours" in params
    rng = np.random.default_rng(23)
    for t in range(160 if d == 6 else 60):
        x = rng.standard_normal(d) / np.sqrt(d)
        y = piece(rng, t, STREAMS[stream])
        arm = f"m{int(rng.integers(4))}"
        # With forgetting: late outcomes (event times behind the latest) weigh less.
        kw = {"time": float(t * 300 - rng.integers(0, 3) * 2000)} if forgetting else {}
        compiled.update(arm, x, y, **kw)
        reference.update(arm, x, y, **kw)
        assert_same_stats(stats, ref, f"after update {t} ({arm}, {sorted(y)})")
    assert not stats.group.all()  # the stream split groups: the partial cases ran
    rows = rng.standard_normal((40, d)) / np.sqrt(d)
    got, want = compiled.decide_batch(rows, PREFS), reference.decide_batch(rows, PREFS)
    np.testing.assert_array_equal(got.choices, want.choices)
    np.testing.assert_allclose(got.propensities, want.propensities, rtol=0, atol=1e-9)
    for x in rows[:8]:
        a, b = compiled.decide(x, PREFS), reference.decide(x, PREFS)
        assert (a.arm, a.explored) == (b.arm, b.explored)
        assert a.propensity == pytest.approx(b.propensity, rel=0, abs=1e-9)


@pytest.mark.parametrize("selecting", [False, True])
def test_partial_update_statistics_weights_and_residual(selecting, monkeypatch):
    """ArmStatistics.update itself with explicit weights: the same residual (None when
    quality is not reported) and arrays as the reference, after every update; the
    compiled statistics never take the numpy steps (``_rank1``), partial outcomes
    included."""
    from bandit import stats as stats_module
    from bandit.stats import ArmStatistics

    numpy_steps = []
    rank1 = stats_module._rank1

    def counted(*args):
        numpy_steps.append(compiled)
        rank1(*args)

    monkeypatch.setattr(stats_module, "_rank1", counted)

    d = 5
    both = []
    for compiled in (True, False):
        stats = ArmStatistics(d, refresh_every=1000,
                              context_ridges=(1.0, 30.0) if selecting else None)
        for _ in range(3):
            stats.append(np.array([1.0, 1.0, 1.0]), np.array([0.5, 0.001, 0.3]),
                         np.array([0.5, 0.001, 1.0]))
        stats.compiled = compiled
        both.append(stats)
    rng = np.random.default_rng(2)
    nan = np.nan
    shapes = ([1, 1, 1], [1, nan, nan], [nan, 1, 1], [nan, nan, 1], [1, nan, 1])
    for t in range(120):
        x = np.r_[rng.standard_normal(d), 1.0]
        y = np.array(shapes[int(rng.integers(len(shapes)))]) * rng.random(3)
        weight = float(rng.choice([1.0, 0.3, 2.5]))
        k = int(rng.integers(3))
        compiled = True
        r_got = both[0].update(k, x, y, weight)
        compiled = False
        r_want = both[1].update(k, x, y, weight)
        assert (r_got is None) == (r_want is None) == bool(np.isnan(y[0]))
        if r_got is not None:
            assert r_got == pytest.approx(r_want, rel=1e-9, abs=1e-9)
        assert_same_stats(both[0], both[1], f"after update {t} (arm {k}, y {y})")
    assert True not in numpy_steps and False in numpy_steps


@pytest.mark.parametrize("cls", [LinUCB, SelectiveThompson])
def test_partial_updates_keep_float32_copies_in_sync(cls):
    """From FLOAT32_INVERSE_DIM features the decides read float32 copies of the shared
    inverses (and of the selected candidates'); the kernel writes them in its steps of
    partial outcomes too: an arm whose copy is not marked stale has it equal to the
    float64 inverse after every update, and the decisions are the reference's."""
    d = FLOAT32_INVERSE_DIM
    compiled, reference = pair(cls, d, refresh_every=1000)
    stats = compiled._stats
    rng = np.random.default_rng(9)
    x = rng.standard_normal(d) / np.sqrt(d)
    for policy in (compiled, reference):  # the same draws; the compiled one's copies
        policy.decide(x, PREFS)
    checked = 0
    for t in range(24):
        x = rng.standard_normal(d) / np.sqrt(d)
        y = piece(rng, t, PIECES if t > 3 else (FULL,))
        arm = f"m{t % 4}"
        compiled.update(arm, x, y)
        reference.update(arm, x, y)
        for name in ("s_inv", "q_inv") if stats.selecting else ("s_inv",):
            source, copy, stale = stats._copies32[name]
            assert source is stats._source(name)
            fresh = ~stale
            checked += int(fresh.sum())
            want = stats.q_inv if name == "q_inv" else stats.s_inv
            # Each row written from the float64 step's result: the same rounding.
            np.testing.assert_array_equal(copy[fresh], want[fresh].astype(np.float32),
                                          err_msg=f"{name} after update {t} {sorted(y)}")
        got, want = (p.decide_batch(x, PREFS, explore=True) for p in (compiled, reference))
        np.testing.assert_array_equal(got.choices, want.choices)
        np.testing.assert_allclose(got.uncertainty, want.uncertainty, rtol=1e-6)
    assert not stats.group.all()
    assert checked > 0  # some copies were up to date, so compared
