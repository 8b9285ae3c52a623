"""The replay engine: bandit feedback only, exact oracle and single-model numbers."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import InvalidInputError, LinUCB, Preferences
from bandit.replay import ReplayLog, cumulative_regret, replay, summarize, warm_start


def synthetic_log(seed: int, n: int, d: int = 5):
    """Two models; which one is better depends on the first context coordinate."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q_a = np.clip(0.5 + 0.4 * x[:, 0], 0, 1)
    q_b = np.clip(0.5 - 0.4 * x[:, 0], 0, 1)
    out = np.zeros((n, 2, 3))
    out[:, 0] = np.c_[q_a, np.full(n, 0.01), np.full(n, 800.0)]
    out[:, 1] = np.c_[q_b, np.full(n, 0.002), np.full(n, np.nan)]
    return x, ReplayLog(["a", "b"], out)


def test_summarize_single_model_choices_equal_model_row():
    _, log = synthetic_log(0, 200)
    prefs = Preferences(quality=1.0, cost=10.0, latency=0.1)
    summary = summarize(log, prefs, np.zeros(200, dtype=int))
    window = summary["all"]
    assert window["policy"] == window["models"]["a"]
    assert window["share"] == {"a": 1.0, "b": 0.0}
    expected_a = (log.outcomes[:, 0, 0] - 10 * 0.01 - 0.1 * 0.8).mean()
    assert window["models"]["a"]["reward"] == pytest.approx(expected_a, abs=1e-12)
    assert window["models"]["b"]["latency_ms"] is None  # unknown latency stays unknown
    assert window["oracle"]["regret"] == 0.0
    assert summary["last_20pct"]["rows"] == 40


def test_replay_learns_context_beats_single_models():
    x, log = synthetic_log(1, 3000)
    prefs = Preferences(quality=1.0)
    run = replay(LinUCB(5, seed=0), x, log, prefs)
    tail = run.summary["last_20pct"]
    best_single = max(m["reward"] for m in tail["models"].values())
    assert tail["policy"]["reward"] > best_single + 0.1
    assert tail["policy"]["regret"] < 0.2 * tail["models"]["a"]["regret"]
    curve = cumulative_regret(log, prefs, run.choices)
    assert curve[-1] == pytest.approx(run.summary["all"]["policy"]["regret"])
    # Sublinear: the second half of the stream adds far less regret than the first.
    assert curve[-1] - curve[1500] < 0.5 * curve[1500]


def test_replay_sees_only_chosen_outcome():
    x, log = synthetic_log(2, 300)
    policy = LinUCB(5, seed=0)
    run = replay(policy, x, log, Preferences())
    counts = {arm: policy.observations(arm)["quality"] for arm in ("a", "b")}
    assert counts == {"a": int((run.choices == 0).sum()), "b": int((run.choices == 1).sum())}
    assert policy.observations("b")["latency"] == 0  # NaN latency was never fed


def test_replay_batched_feedback_same_rows():
    x, log = synthetic_log(3, 512)
    run = replay(LinUCB(5, seed=0), x, log, Preferences(), batch_size=64, propensities=True)
    assert run.summary["rows"] == 512
    assert np.all((run.propensities > 0) & (run.propensities <= 1))


def test_replay_log_missing_quality_names_row():
    _, log = synthetic_log(4, 10)
    out = log.outcomes.copy()
    out[3, 1, 0] = np.nan
    with pytest.raises(InvalidInputError) as err:
        ReplayLog(["a", "b"], out)
    assert err.value.field == "outcomes[3].b.quality"


def test_replay_wrong_row_count_raises():
    x, log = synthetic_log(5, 10)
    with pytest.raises(InvalidInputError) as err:
        replay(LinUCB(5), x[:5], log, Preferences())
    assert err.value.field == "x"


def test_warm_start_fits_full_information_and_lowers_early_regret():
    x, log = synthetic_log(6, 1400)
    prefs = Preferences()
    warm = warm_start(LinUCB(5, seed=0), x[:400], ReplayLog(log.arms, log.outcomes[:400]))
    assert warm.observations("a")["quality"] == 400  # every arm saw every row
    cold_run = replay(LinUCB(5, seed=0), x[400:], ReplayLog(log.arms, log.outcomes[400:]),
                      prefs)
    warm_run = replay(warm, x[400:], ReplayLog(log.arms, log.outcomes[400:]), prefs)
    early = slice(0, 300)
    cold_regret = cumulative_regret(log, prefs, np.r_[np.zeros(400, int), cold_run.choices])
    warm_regret = cumulative_regret(log, prefs, np.r_[np.zeros(400, int), warm_run.choices])
    gain_cold = cold_regret[400 + early.stop] - cold_regret[400]
    gain_warm = warm_regret[400 + early.stop] - warm_regret[400]
    assert gain_warm < 0.5 * gain_cold


def test_warm_start_weight_discounts_observations():
    x, log = synthetic_log(7, 100)
    full = warm_start(LinUCB(5, seed=0, drift_delta=None), x, log)
    light = warm_start(LinUCB(5, seed=0, drift_delta=None), x, log, weight=0.25)
    np.testing.assert_allclose(light._stats.weight, 0.25 * full._stats.weight)
    # (w X'X + lam I)^-1 (w X'y + lam mu0) = (X'X + lam/w I)^-1 (X'y + lam/w mu0): a
    # weight w is a ridge lam / w on undiscounted data.
    stiff = warm_start(LinUCB(5, seed=0, drift_delta=None, ridge=4.0), x, log)
    np.testing.assert_allclose(light._stats.theta, stiff._stats.theta, atol=1e-9)
    assert not np.allclose(light._stats.theta, full._stats.theta, atol=1e-3)
    with pytest.raises(InvalidInputError) as err:
        warm_start(LinUCB(5), x, log, weight=0.0)
    assert err.value.field == "weight"


def test_warm_start_keeps_every_labelled_row_under_drift_detection():
    """A labelled log ordered by task (the first half easy, the second hard for model a)
    is not drift: with the default drift detector on, the warm start keeps all of it."""
    x, log = synthetic_log(8, 2000)
    out = log.outcomes.copy()
    out[1000:, 0, 0] = np.clip(out[1000:, 0, 0] - 0.4, 0, 1)  # the hard half comes last
    shifted = ReplayLog(log.arms, out)
    warm = warm_start(LinUCB(5, seed=0), x, shifted)  # drift_delta default (on)
    reference = warm_start(LinUCB(5, seed=0, drift_delta=None), x, shifted)
    assert warm.drift_events == {"a": 0, "b": 0}
    np.testing.assert_allclose(warm._stats.weight, reference._stats.weight)
    np.testing.assert_allclose(warm._stats.weight[:, 0], [2000.0, 2000.0])
    np.testing.assert_allclose(warm._stats.theta, reference._stats.theta, atol=1e-9)
    # The detector still watches live feedback afterwards: the same shift, streamed,
    # is a change in the arm's quality, and it fires.
    live = LinUCB(5, seed=0)
    live.add_arm("a")
    live.add_arm("b")
    for t in range(2000):
        for j, arm in enumerate(("a", "b")):
            live.update(arm, x[t], {"quality": float(out[t, j, 0])}, now=float(t))
    assert live.drift_events["a"] >= 1
