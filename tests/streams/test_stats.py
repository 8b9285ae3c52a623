"""Partition statistics with forgetting: sums decayed to a common time (no servers)."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import ArmPrior, LinUCB, Policy
from streams.stats import (
    HalfLifeMismatchError,
    check_half_life,
    new_statistics,
    recast,
    sum_statistics,
    sums_only,
)
from tests.streams.helpers import DIM, MODELS, assert_same_statistics

HALF_LIFE = 24.0
DAY = 86400.0


def _events(seed: int, n: int = 600) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Arms, contexts, (n, 3) outcomes with missing values, event times over ten days."""
    rng = np.random.default_rng(seed)
    arms = [MODELS[i] for i in rng.integers(len(MODELS), size=n)]
    x = rng.normal(size=(n, DIM))
    y = np.column_stack([rng.uniform(size=n), rng.uniform(0, 0.01, size=n),
                         rng.uniform(50, 2000, size=n)])
    y[rng.uniform(size=(n, 3)) < 0.2] = np.nan
    y[np.isnan(y).all(axis=1), 0] = 0.5  # every event reports something
    # Whole seconds, some shared: several events of one decision have one time.
    times = 1.7e9 + np.floor(rng.uniform(0, 10 * DAY, size=n))
    return arms, x, y, times


def _one_process(arms: list[str], x: np.ndarray, y: np.ndarray, times: np.ndarray,
                 now: float) -> Policy:
    """One process that saw every event in time order, forgetting as embedded mode does."""
    policy = LinUCB(DIM, seed=0, drift_delta=None, half_life_hours=HALF_LIFE,
                    decay_interval_s=0.0)
    for name in MODELS:
        policy.add_arm(name)
    for i in np.argsort(times, kind="stable"):
        outcome = {k: float(v) for k, v in zip(("quality", "cost_usd", "latency_ms"), y[i],
                                               strict=True) if not np.isnan(v)}
        policy.update(arms[i], x[i], outcome, now=float(times[i]))
    policy.decay(now)
    return policy


def _partitions(arms: list[str], x: np.ndarray, y: np.ndarray, times: np.ndarray,
                n_parts: int, seed: int) -> list[Policy]:
    """Each partition applies its events in a random order, in random batch sizes."""
    rng = np.random.default_rng(seed)
    owner = rng.integers(n_parts, size=len(arms))
    parts = []
    for p in range(n_parts):
        idx = rng.permutation(np.flatnonzero(owner == p))
        stats = new_statistics(DIM, HALF_LIFE)
        start = 0
        while start < len(idx):
            batch = idx[start:start + int(rng.integers(1, 80))]
            start += len(batch)
            for i in batch:
                if arms[i] not in stats.arms:
                    stats.add_arm(arms[i])
            stats.update_batch([arms[i] for i in batch], x[batch], y[batch],
                               times=times[batch])
        # What the learner stores and the decider reads back.
        parts.append(Policy.from_bytes(stats.to_bytes(derived=False)))
    return parts


@pytest.mark.parametrize(("n_parts", "seed"), [(1, 0), (3, 1), (6, 2), (6, 3), (17, 4)])
def test_sum_statistics_forgetting_any_split_equals_one_process(n_parts: int,
                                                                seed: int) -> None:
    arms, x, y, times = _events(seed)
    now = float(times.max()) + 3 * 3600.0  # the decider's clock, after the last event
    expected = _one_process(arms, x, y, times, now)
    parts = _partitions(arms, x, y, times, n_parts, seed + 100)
    order = np.random.default_rng(seed).permutation(n_parts)
    total = sum_statistics([parts[i] for i in order], DIM, HALF_LIFE, now)
    assert total.reference_time == now
    assert_same_statistics(total, expected)
    # Not vacuous: ten days are ten half-lives, so without forgetting the sums differ.
    plain = sum_statistics([Policy.from_bytes(p.to_bytes(), half_life_hours=None)
                            for p in _partitions(arms, x, y, times * 0.0, n_parts, seed)], DIM)
    with pytest.raises(AssertionError):
        assert_same_statistics(plain, expected)


def test_sum_statistics_forgetting_equals_closed_form() -> None:
    arms, x, y, times = _events(7)
    now = float(times.max()) + DAY
    total = sum_statistics(_partitions(arms, x, y, times, 4, 7), DIM, HALF_LIFE, now)
    w = 0.5 ** ((now - times) / 3600.0 / HALF_LIFE)
    for name in MODELS:
        rows = np.array([a == name for a in arms]) & ~np.isnan(y[:, 0])
        xb = np.column_stack([x[rows], np.ones(rows.sum())])  # bias feature last
        want = (xb * w[rows, None]).T @ xb
        got = total._stats.matrices_of(total._index[name], "a_data")[0]  # noqa: SLF001
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max())
        np.testing.assert_allclose(total._stats.weight[total._index[name], 0],  # noqa: SLF001
                                   w[rows].sum(), rtol=1e-12)


def test_sum_statistics_idle_decays_data_never_prior() -> None:
    arms, x, y, times = _events(11, n=200)
    parts = _partitions(arms, x, y, times, 3, 11)
    last = float(times.max())
    near = sum_statistics(parts, DIM, HALF_LIFE, last)
    far = sum_statistics(parts, DIM, HALF_LIFE, last + 2 * HALF_LIFE * 3600.0)
    np.testing.assert_allclose(far._stats.weight, near._stats.weight / 4.0,  # noqa: SLF001
                               rtol=1e-12)
    np.testing.assert_allclose(far._stats.b_data, near._stats.b_data / 4.0,  # noqa: SLF001
                               rtol=1e-12, atol=1e-300)
    # The decider's policy: the registry's priors merged with the decayed sums.
    decider = LinUCB(DIM, seed=0, half_life_hours=HALF_LIFE)
    for name in MODELS:
        decider.add_arm(name, ArmPrior(quality=0.8, cost_usd=0.002))
    prior = {k: getattr(decider._stats, k).copy() for k in ("lam", "mu0")}  # noqa: SLF001
    decider.merge(recast(far, LinUCB))
    for key, value in prior.items():
        np.testing.assert_array_equal(getattr(decider._stats, key), value)  # noqa: SLF001
    assert decider.reference_time == last + 2 * HALF_LIFE * 3600.0


def test_update_batch_times_any_batches_equal_one_batch() -> None:
    arms, x, y, times = _events(5, n=300)
    one = new_statistics(DIM, HALF_LIFE)
    many = new_statistics(DIM, HALF_LIFE)
    for name in MODELS:
        one.add_arm(name)
        many.add_arm(name)
    one.update_batch(arms, x, y, times=times)
    for chunk in np.array_split(np.random.default_rng(0).permutation(len(arms)), 7):
        many.update_batch([arms[i] for i in chunk], x[chunk], y[chunk], times=times[chunk])
    assert one.reference_time == many.reference_time == float(times.max())
    assert_same_statistics(many, one)


def test_check_half_life_mismatch_names_setting() -> None:
    stored = new_statistics(DIM, 24.0)
    assert check_half_life(stored, 24.0, "partition 0") is stored
    for other in (None, 168.0):
        with pytest.raises(HalfLifeMismatchError) as info:
            check_half_life(stored, other, "partition 3 (shared)")
        message = str(info.value)
        assert message.startswith(f"half_life_hours: is {other} here, but the stored "
                                  "statistics of partition 3 (shared) were learned with 24.0")
        assert "BANDIT_ROUTER_HALF_LIFE_HOURS" in message and "--half-life-hours" in message
    with pytest.raises(HalfLifeMismatchError):
        check_half_life(new_statistics(DIM), 24.0, "partition 0")


@pytest.mark.parametrize("half_life", [None, HALF_LIFE])
def test_sums_only_carrier_stores_the_same_statistics(half_life: float | None) -> None:
    """A learner's carrier skips the inverses after each batch (``sums_only``); what it
    stores, read back, is what a carrier that kept them stores: sums, the candidates'
    errors and, recomputed on reading, the coefficients."""
    arms, x, y, times = _events(3, n=400)
    full, lean = new_statistics(DIM, half_life), sums_only(new_statistics(DIM, half_life))
    for name in MODELS:
        full.add_arm(name)
        lean.add_arm(name)
    for chunk in np.array_split(np.arange(len(arms)), 5):  # in order: the errors' order
        for policy in (full, lean):
            policy.update_batch([arms[i] for i in chunk], x[chunk], y[chunk],
                                times=None if half_life is None else times[chunk])
    stale = lean._stats.theta  # noqa: SLF001 - the skipped work is the point
    assert not np.allclose(stale, full._stats.theta)  # noqa: SLF001
    for derived in (False, True):  # a sums-only carrier never writes stale inverses
        a = Policy.from_bytes(full.to_bytes(derived=False))
        b = Policy.from_bytes(lean.to_bytes(derived=derived))
        assert_same_statistics(b, a, tol=0.0)
        for name in ("sel_err", "theta", "sigma2", "q_inv", "updates"):
            np.testing.assert_array_equal(getattr(b._stats, name),  # noqa: SLF001
                                          getattr(a._stats, name), err_msg=name)  # noqa: SLF001


def test_carriers_store_the_cold_start_every_version_reads():
    # The previous version refuses cold_start_by="added-on-tags" (this one's default):
    # the partition statistics of a rolling upgrade must stay readable by its learners
    # and deciders. Carriers never decide, so "arm" loses nothing.
    from streams.stats import as_carrier

    stats = new_statistics(DIM, HALF_LIFE)
    stats.add_arm(MODELS[0])
    stats.update(MODELS[0], np.ones(DIM), {"quality": 0.5}, time=0.0)
    assert Policy.from_bytes(stats.to_bytes(derived=False)).config.cold_start_by == "arm"
    stored = Policy.from_bytes(stats.to_bytes(derived=False), cold_start_by="added-on-tags")
    assert as_carrier(stored).config.cold_start_by == "arm"
    assert as_carrier(stored).observations(MODELS[0])["quality"] == 1
