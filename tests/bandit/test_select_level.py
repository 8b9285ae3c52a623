"""SelectiveThompson's shared quality level (``level_horizon``): arms compared on a
stream whose difficulty drifts (issue 13, docs/results.md "A level that follows the
stream's difficulty")."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import InvalidInputError, Policy, Preferences, SelectiveThompson

DIM = 4


def _policy(level: float | None, seed: int = 0, **params: object) -> SelectiveThompson:
    policy = SelectiveThompson(DIM, seed=seed, level_horizon=level, drift_delta=None,
                               **params)
    policy.add_arm("a")
    policy.add_arm("b")
    return policy


def _outage_stream(policy: Policy, seed: int) -> np.ndarray:
    """Both models scored on the same 300 hard queries (b better: 0.25 against 0.10),
    then 600 easy queries while b is out of the candidates (an outage: only a is
    called), then both candidates again on easy queries (a 0.70, b still 0.15 better).
    Returns the choices of the last phase (0 = a, 1 = b)."""
    rng = np.random.default_rng(seed)
    for _ in range(300):
        x = rng.standard_normal(DIM) / np.sqrt(DIM)
        for arm, quality in (("a", 0.10), ("b", 0.25)):
            policy.update(arm, x, {"quality": float(rng.random() < quality)})
    last = []
    for candidates in (["a"],) * 600 + (["a", "b"],) * 600:
        x = rng.standard_normal(DIM) / np.sqrt(DIM)
        arm = policy.decide(x, candidates=candidates).arm
        quality = 0.70 if arm == "a" else 0.85
        policy.update(arm, x, {"quality": float(rng.random() < quality)})
        if len(candidates) == 2:
            last.append(policy.arms.index(arm))
    return np.array(last)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_level_revisits_model_learned_on_harder_queries(seed):
    """Without the level, b's estimate stays at what the hard queries taught (0.25)
    while a's follows the easy ones (0.7): b is never called again. The level moves
    with a's residuals (a has 300 outcomes: most of its shift is the level's), so b is
    predicted relative to it, tried, and takes over."""
    with_level = _outage_stream(_policy(100.0, seed), seed)
    without = _outage_stream(_policy(None, seed), seed)
    assert (with_level[-300:] == 1).mean() > 0.8
    assert (without[-300:] == 1).mean() < 0.2


def test_level_follows_common_shift_and_predictions_include_it():
    x = np.zeros(DIM)
    gaps = {}
    for level in (50.0, None):
        policy = _policy(level)
        for _ in range(400):
            policy.update("a", x, {"quality": 0.2})
            policy.update("b", x, {"quality": 0.3})
        for _ in range(400):
            policy.update("a", x, {"quality": 0.8})
        predicted = policy.predict(x)
        gaps[level] = predicted["b"].quality - predicted["a"].quality
        if level is None:
            assert policy._level == 0.0
            assert predicted["a"].quality == pytest.approx(0.5, abs=0.02)  # the average
        else:
            assert policy._level > 0.4  # most of a's shift is common to every arm
            assert predicted["a"].quality == pytest.approx(0.8, abs=0.05)
    # b was never seen on the new queries: with the level it stays above a (it was 0.1
    # above it), without it keeps its old 0.3, below a's average of both periods.
    assert gaps[50.0] > 0.0
    assert gaps[None] < -0.15


def _fed(level: float | None, seed: int = 3, n: int = 200) -> SelectiveThompson:
    policy = _policy(level, seed=seed, epsilon=0.05)
    rng = np.random.default_rng(seed)
    for t in range(n):
        x = rng.standard_normal(DIM)
        arm = "a" if t % 3 else "b"
        policy.update(arm, x, {"quality": float(rng.random() < (0.3 if t < n / 2 else 0.8))})
    return policy


def test_level_same_seed_same_decisions():
    one, two = _fed(100.0), _fed(100.0)
    rng = np.random.default_rng(4)
    prefs = Preferences(quality=1.0, cost=2.0)
    for _ in range(100):
        x = rng.standard_normal(DIM)
        d1, d2 = one.decide(x, prefs), two.decide(x, prefs)
        assert (d1.arm, d1.propensity) == (d2.arm, d2.propensity)
        for p in (one, two):
            p.update(d1.arm, x, {"quality": 0.9 if d1.arm == "b" else 0.4})
    assert one._level == two._level != 0.0


@pytest.mark.parametrize("derived", [True, False])
def test_level_restore_round_trip_identical_decisions(derived):
    policy = _fed(100.0)
    assert policy._level != 0.0
    restored = Policy.from_bytes(policy.to_bytes(derived=derived))
    assert restored.config.level_horizon == 100.0
    assert restored._level == policy._level
    rng = np.random.default_rng(5)
    for _ in range(50):
        x = rng.standard_normal(DIM)
        d1, d2 = policy.decide(x), restored.decide(x)
        # Sums-only restores recompute the inverses: equal to rounding.
        assert d1.arm == d2.arm
        assert d1.propensity == pytest.approx(d2.propensity, abs=1e-9)
        assert d1.scores == pytest.approx(d2.scores, abs=1e-9)
        for p in (policy, restored):
            p.update(d1.arm, x, {"quality": 0.7})
    assert restored._level == pytest.approx(policy._level, abs=1e-12)


def test_level_merge_weighted_by_observations():
    left, right = _fed(100.0, seed=3, n=300), _fed(100.0, seed=6, n=100)
    w_left = float(left._stats.weight[:, 0].sum())
    w_right = float(right._stats.weight[:, 0].sum())
    expected = (w_left * left._level + w_right * right._level) / (w_left + w_right)
    assert left._level != right._level
    merged = left.merge(right)
    assert merged._level == pytest.approx(expected, abs=1e-12)
    # A replica with no data leaves the level (and every prediction) unchanged.
    before = merged.predict(np.ones(DIM))
    merged.merge(_policy(100.0, seed=9))
    after = merged.predict(np.ones(DIM))
    assert merged._level == pytest.approx(expected, abs=1e-12)
    assert {k: v.quality for k, v in after.items()} == pytest.approx(
        {k: v.quality for k, v in before.items()}, abs=1e-9)


@pytest.mark.parametrize("value", [0.5, 0.0, -3.0, float("inf"), "100", True])
def test_level_bad_horizon_raises_naming_field(value):
    with pytest.raises(InvalidInputError) as err:
        SelectiveThompson(DIM, level_horizon=value)
    assert err.value.field == "level_horizon"
    assert "level_horizon" in str(err.value)
