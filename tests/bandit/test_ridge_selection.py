"""Model selection of the quality head among candidate context ridges (issue 13)."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import (
    InvalidInputError,
    LinearThompson,
    LinUCB,
    Policy,
    Preferences,
    SelectiveThompson,
)

POLICIES = [LinUCB, LinearThompson, SelectiveThompson]
GRID = (1e6, 100.0, 1.0)


def _ridge_fit(x: np.ndarray, y: np.ndarray, context_ridge: float,
               lam: float = 1.0, mu0: float = 0.5) -> np.ndarray:
    """Ridge regression with penalty lam * diag(context_ridge, ..., 1) around the prior
    mean mu0 on the bias coefficient: what one candidate must hold."""
    xb = np.c_[x, np.ones(len(x))]
    d = xb.shape[1]
    penalty = lam * np.diag(np.r_[np.full(d - 1, context_ridge), 1.0])
    prior = np.zeros(d)
    prior[-1] = mu0
    return np.linalg.solve(xb.T @ xb + penalty, xb.T @ y + penalty @ prior)


def _stream(seed: int, n: int, d: int, signal: float):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) / np.sqrt(d)
    y = np.clip(0.5 + signal * x[:, 0] * np.sqrt(d) * 0.3
                + 0.2 * rng.standard_normal(n), 0.0, 1.0)
    return x, y


def test_candidates_are_ridge_fits_and_selection_is_prequential():
    d = 3
    x, y = _stream(0, 60, d, signal=1.0)
    policy = LinUCB(d, seed=0, drift_delta=None, context_ridges=GRID, shared_ridge=None)
    policy.add_arm("a")
    errors = np.zeros(len(GRID))
    for t in range(len(x)):
        # The error of each candidate on row t, from the fit on rows before t.
        for g, ridge in enumerate(GRID):
            theta = _ridge_fit(x[:t], y[:t], ridge)
            errors[g] += (y[t] - np.r_[x[t], 1.0] @ theta) ** 2
        policy.update("a", x[t], {"quality": float(y[t])})
    stats = policy._stats
    np.testing.assert_allclose(stats.sel_err[0], errors, rtol=1e-8)
    for g, ridge in enumerate(GRID):
        np.testing.assert_allclose(stats.sel_theta[0, g], _ridge_fit(x, y, ridge),
                                   atol=1e-9)
    best = int(np.argmin(errors))
    assert best != 0  # the quality depends on x[0]: the context model predicts better
    probe = np.array([0.3, -0.2, 0.1])
    expected = np.r_[probe, 1.0] @ _ridge_fit(x, y, GRID[best])
    assert policy.predict(probe)["a"].quality == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("cls", POLICIES)
def test_selection_context_only_where_it_predicts(cls):
    d = 8
    x, informative = _stream(1, 400, d, signal=1.0)
    _, noise = _stream(2, 400, d, signal=0.0)
    policy = cls(d, seed=0, drift_delta=None, context_ridges=GRID, shared_ridge=None)
    policy.add_arm("context")
    policy.add_arm("noise")
    for t in range(len(x)):
        policy.update("context", x[t], {"quality": float(informative[t])})
        policy.update("noise", x[t], {"quality": float(noise[t])})
    chosen = policy._stats.selected()
    assert GRID[chosen[0]] < 1e6  # the arm whose quality the context predicts uses it
    assert chosen[1] == 0  # the other is predicted by its mean: intercept only
    # Predicted by its mean: the same quality whatever the context.
    q = [policy.predict(row)["noise"].quality for row in x[:5] * 3]
    assert max(q) - min(q) < 1e-3


def test_selection_batch_update_matches_one_by_one_sums():
    d = 4
    x, y = _stream(3, 50, d, signal=1.0)
    one = LinUCB(d, seed=0, drift_delta=None, context_ridges=GRID)
    batch = LinUCB(d, seed=0, drift_delta=None, context_ridges=GRID)
    for p in (one, batch):
        p.add_arm("a")
    for t in range(len(x)):
        one.update("a", x[t], {"quality": float(y[t])})
    batch.update_batch(["a"] * len(x), x, [{"quality": float(v)} for v in y])
    # The candidates' fits are the same sums; the batch's errors are all predicted from
    # the state before the batch: the prior mean 0.5, for every candidate.
    np.testing.assert_allclose(batch._stats.sel_theta, one._stats.sel_theta, atol=1e-9)
    np.testing.assert_allclose(batch._stats.sel_err[0], np.full(len(GRID),
                                                                ((y - 0.5) ** 2).sum()))
    # A second batch is scored by the fits of the first.
    before = batch._stats.sel_theta[0].copy()
    batch.update_batch(["a"] * 10, x[:10], [{"quality": float(v)} for v in y[:10]])
    expected = ((y[:10, None] - np.c_[x[:10], np.ones(10)] @ before.T) ** 2).sum(axis=0)
    np.testing.assert_allclose(batch._stats.sel_err[0],
                               ((y - 0.5) ** 2).sum() + expected, rtol=1e-9)


@pytest.mark.parametrize("cls", POLICIES)
def test_selection_round_trip_and_restore_without_selection(cls):
    d = 4
    x, y = _stream(4, 80, d, signal=1.0)
    policy = cls(d, seed=3, drift_delta=None, context_ridges=GRID)
    policy.add_arm("a")
    policy.add_arm("b")
    for t in range(len(x)):
        policy.update("ab"[t % 2], x[t], {"quality": float(y[t]), "cost_usd": 0.001})
    ctx = x[:16]
    prefs = Preferences(cost=10.0)
    for derived in (True, False):
        restored = Policy.from_bytes(policy.to_bytes(derived=derived))
        np.testing.assert_allclose(restored._stats.sel_err, policy._stats.sel_err)
        a = restored.decide_batch(ctx, prefs, explore=False)
        b = policy.decide_batch(ctx, prefs, explore=False)
        np.testing.assert_allclose(a.means, b.means, atol=1e-9)
    # Restored without selection: the sums stay, the quality head is the plain ridge fit.
    # (SelectiveThompson fills None with its nested models: restore as plain Thompson.)
    plain_class = {"as_class": LinearThompson} if cls is SelectiveThompson else {}
    plain = Policy.from_bytes(policy.to_bytes(), context_ridges=None, **plain_class)
    assert plain._stats.sel_err.shape == (2, 0)
    np.testing.assert_allclose(plain._stats.b_data, policy._stats.b_data)
    # And back with other candidates: their errors start afresh.
    other = Policy.from_bytes(policy.to_bytes(), context_ridges=[1e6, 10.0])
    assert other._stats.sel_err.tolist() == [[0.0, 0.0], [0.0, 0.0]]


def test_selection_shared_component_equals_joint_ridge_solution():
    """With per-arm candidates the hybrid model is still the exact joint ridge fit, each
    arm's deviation penalized with its selected candidate's ridge."""
    rng = np.random.default_rng(0)
    d, k = 3, 2
    grid = (1e6, 2.0)
    policy = LinUCB(d, seed=0, shared_ridge=2.0, context_ridges=grid, drift_delta=None)
    for name in "ab":
        policy.add_arm(name)
    x = rng.standard_normal((80, d))
    arms = np.arange(80) % 2
    # Arm a's quality follows x[0]; arm b's is noise around 0.4.
    y = np.clip(np.where(arms == 0, 0.5 + 0.15 * x[:, 0], 0.4)
                + 0.05 * rng.standard_normal(80), 0.0, 1.0)
    for xi, a, q in zip(x, arms, y, strict=True):
        policy.update("ab"[a], xi, {"quality": float(q)}, now=0.0)
    chosen = policy._stats.selected()
    assert chosen.tolist() == [1, 0]  # a uses its context, b only its mean
    # One ridge regression over [beta, theta_a, theta_b]: columns [x, x if a, x if b].
    xb = np.c_[x, np.ones(80)]
    design = np.hstack([xb] + [xb * (arms == j)[:, None] for j in range(k)])
    penalty = np.diag(np.concatenate(
        [np.full(d + 1, 2.0)] + [np.r_[np.full(d, grid[g]), 1.0] for g in chosen]))
    prior = np.r_[np.zeros(d + 1), np.tile(np.r_[np.zeros(d), 0.5], k)]
    sol = np.linalg.solve(design.T @ design + penalty, design.T @ y + penalty @ prior)
    coef = sol.reshape(k + 1, d + 1)
    preds = policy.predict(x[0])
    for j, name in enumerate("ab"):
        joint = xb[0] @ (coef[0] + coef[j + 1])
        assert preds[name].quality == pytest.approx(joint, abs=1e-8)


@pytest.mark.parametrize("bad", [(), (1.0,) * 9, (0.0,), (1e7,), (float("nan"),), "10",
                                 (True,)])
def test_context_ridges_bad_value_rejected(bad):
    with pytest.raises(InvalidInputError) as err:
        LinUCB(3, context_ridges=bad)
    assert err.value.field.startswith("context_ridges")
