"""Forgetting by event time, one outcome at a time: ``update(..., time=t)`` is the
rank-one form of ``update_batch(..., times=...)``."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import InvalidInputError, LinearThompson, LinUCB

DIM = 4
ARMS = ("a", "b", "c")


def _policy(cls, **config):
    policy = cls(DIM, seed=0, half_life_hours=24.0, drift_delta=None, **config)
    for arm in ARMS:
        policy.add_arm(arm)
    return policy


def _events(n: int, seed: int):
    rng = np.random.default_rng(seed)
    arms = [ARMS[i] for i in rng.integers(0, len(ARMS), n)]
    x = rng.standard_normal((n, DIM)) / 2
    q = rng.random(n)
    c = rng.random(n) * 1e-3
    times = rng.uniform(0.0, 240 * 3600.0, n)  # ten days, arriving in random order
    outcomes = [{"quality": float(a), "cost_usd": float(b)} for a, b in zip(q, c,
                                                                             strict=True)]
    return arms, x, outcomes, times


def _assert_same(p, q, tol=1e-9):
    sp, sq = p._stats, q._stats
    assert p.reference_time == q.reference_time
    for name in ("b_data", "srr", "weight", "count"):
        np.testing.assert_allclose(getattr(sp, name), getattr(sq, name), rtol=tol,
                                   atol=tol, err_msg=name)
    np.testing.assert_allclose(sp.theta, sq.theta, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson])
@pytest.mark.parametrize("refresh_every", [1000, 7])
def test_update_with_time_equals_update_batch_times_in_any_order(cls, refresh_every):
    arms, x, outcomes, times = _events(300, seed=1)
    one = _policy(cls, refresh_every=refresh_every)
    for arm, row, outcome, t in zip(arms, x, outcomes, times, strict=True):
        one.update(arm, row, outcome, time=float(t))
    batch = _policy(cls)
    batch.update_batch(arms, x, outcomes, times=times)
    _assert_same(one, batch)
    # and a different arrival order ends at the same statistics
    order = np.random.default_rng(2).permutation(len(arms))
    other = _policy(cls, refresh_every=refresh_every)
    for i in order:
        other.update(arms[i], x[i], outcomes[i], time=float(times[i]))
    _assert_same(one, other)
    # predictions (the inverses) agree too
    probe = np.ones(DIM) / 2
    for arm, p in one.predict(probe).items():
        assert p.quality == pytest.approx(batch.predict(probe)[arm].quality, abs=1e-8)


def test_late_outcome_weighs_its_age_and_now_does_not():
    timed = _policy(LinUCB, decay_interval_s=0.0)
    timed.update("a", [1, 0, 0, 0], {"quality": 1.0}, time=48 * 3600.0)
    timed.update("a", [1, 0, 0, 0], {"quality": 1.0}, time=0.0)  # two half-lives old
    assert timed._stats.weight[0, 0] == pytest.approx(1.25, abs=1e-12)
    arrival = _policy(LinUCB, decay_interval_s=0.0)
    arrival.update("a", [1, 0, 0, 0], {"quality": 1.0}, now=48 * 3600.0)
    arrival.update("a", [1, 0, 0, 0], {"quality": 1.0}, now=0.0)  # never un-decays
    assert arrival._stats.weight[0, 0] == pytest.approx(2.0, abs=1e-12)


def test_time_without_forgetting_is_a_plain_update_and_bad_time_is_refused():
    plain, timed = LinUCB(DIM, seed=0), LinUCB(DIM, seed=0)
    for p in (plain, timed):
        p.add_arm("a")
    plain.update("a", [1, 2, 0, 0], {"quality": 0.5})
    timed.update("a", [1, 2, 0, 0], {"quality": 0.5}, time=123.0)
    np.testing.assert_array_equal(plain._stats.theta, timed._stats.theta)
    np.testing.assert_array_equal(plain._stats.weight, timed._stats.weight)
    policy = _policy(LinUCB)
    with pytest.raises(InvalidInputError) as err:
        policy.update("a", [1, 0, 0, 0], {"quality": 1.0}, time=float("nan"))
    assert err.value.field == "time"
    with pytest.raises(InvalidInputError) as err:
        policy.update("a", [1, 0, 0, 0], {"quality": 1.0}, time=1.0, now=2.0)
    assert err.value.field == "now"
    assert policy._stats.weight.sum() == 0  # nothing learned from refused input
