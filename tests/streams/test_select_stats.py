"""The default policy's model selection from partition statistics (no servers).

The learners' carriers score the candidates of ``select`` (prequential errors, event by
event): the deciders' rebuilt ``select`` then picks, per model, the candidate an
embedded ``select`` fed the same events picks, and decides as it does.
"""

from __future__ import annotations

import numpy as np
import pytest

from bandit import LinUCB, Policy, SelectiveThompson
from bandit.stats import ArmStatistics, sequential_errors
from streams.stats import (
    as_carrier,
    candidate_settings,
    load_statistics,
    new_statistics,
    recast,
    sum_statistics,
)
from tests.streams.helpers import DIM, MODELS

#: Quality depends on the context for these models, not for the others.
CONTEXTUAL = MODELS[:2]


def _events(seed: int, n: int = 1200) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    arms = [MODELS[i] for i in rng.integers(len(MODELS), size=n)]
    x = rng.normal(size=(n, DIM))
    slope = {name: (0.3 if name in CONTEXTUAL else 0.0) for name in MODELS}
    q = np.array([0.5 + slope[a] * x[i, 0] for i, a in enumerate(arms)])
    q = np.clip(q + rng.normal(0, 0.05, size=n), 0.0, 1.0)
    y = np.column_stack([q, rng.uniform(0, 0.01, size=n), rng.uniform(50, 2000, size=n)])
    y[rng.uniform(size=n) < 0.1, 0] = np.nan  # some events report no quality
    return arms, x, y


def _outcome(row: np.ndarray) -> dict[str, float]:
    return {k: float(v) for k, v in zip(("quality", "cost_usd", "latency_ms"), row,
                                        strict=True) if not np.isnan(v)}


def _embedded(arms: list[str], x: np.ndarray, y: np.ndarray) -> SelectiveThompson:
    """The embedded mode's ``select``: one update per event, in order (drift off, as
    in distributed mode)."""
    policy = SelectiveThompson(DIM, seed=0, drift_delta=None)
    for name in MODELS:
        policy.add_arm(name)
    for i, arm in enumerate(arms):
        policy.update(arm, x[i], _outcome(y[i]))
    return policy


def _partition(arms: list[str], x: np.ndarray, y: np.ndarray, idx: np.ndarray,
               rng: np.random.Generator) -> Policy:
    """A learner's carrier: the partition's events in order, in random batch sizes,
    stored (sums only) and read back."""
    stats = new_statistics(DIM)
    start = 0
    while start < len(idx):
        batch = idx[start:start + int(rng.integers(1, 300))]
        start += len(batch)
        for i in batch:
            if arms[i] not in stats.arms:
                stats.add_arm(arms[i])
        stats.update_batch([arms[i] for i in batch], x[batch], y[batch])
    return load_statistics(stats.to_bytes(derived=False), DIM, None, "partition 0")


def _decider(total: Policy) -> SelectiveThompson:
    """The decider's rebuild (service/distributed.py ``snapshot``): priors + sums."""
    policy = SelectiveThompson(DIM, seed=0, drift_delta=None)
    for name in MODELS:
        policy.add_arm(name)
    return policy.merge(recast(total, SelectiveThompson, **candidate_settings(policy.config)))


def _selected(policy: Policy) -> dict[str, int]:
    chosen = policy._stats.selected()  # noqa: SLF001 - the selection under test
    return {name: int(chosen[policy._index[name]]) for name in MODELS}  # noqa: SLF001


def _errors(policy: Policy) -> np.ndarray:
    stats = policy._stats  # noqa: SLF001
    return stats.sel_err[[policy._index[n] for n in MODELS]]  # noqa: SLF001


@pytest.mark.parametrize("n", [1, 7, 64, 65, 300])
def test_sequential_errors_equal_one_update_per_row(n: int) -> None:
    rng = np.random.default_rng(n)
    d = DIM + 1
    one, batch = (ArmStatistics(DIM, context_ridge=100.0, context_ridges=(1e6, 100.0, 1.0))
                  for _ in range(2))
    for stats in (one, batch):
        stats.append(np.ones(3), np.array([0.5, 0.0, 0.0]), np.array([0.5, 1e-3, 1.0]))
    x = np.column_stack([rng.normal(size=(n, d - 1)), np.ones(n)])
    y = np.column_stack([rng.uniform(size=n), np.full((n, 2), np.nan)])
    w = rng.uniform(0.0, 1.0, size=n)
    w[::5] = 0.0  # forgotten rows weigh nothing
    # The candidates' matrices and common target before the batch (no data yet).
    a = np.stack([np.diag(r) for r in batch.sel_diag])  # lambda = 1
    b = np.zeros(d)
    b[-1] = 0.5  # the prior mean on the bias
    before = (a.copy(), b.copy())
    got = sequential_errors(a, b, x, y[:, 0], w, block=16)
    for i in range(n):
        if w[i] > 0:
            one.update(0, x[i], y[i], float(w[i]))
    np.testing.assert_allclose(got, one.sel_err[0], rtol=1e-10, atol=1e-14)
    # The caller's arrays are not moved.
    np.testing.assert_array_equal(a, before[0])
    np.testing.assert_array_equal(b, before[1])


def test_one_partition_selects_like_embedded_select() -> None:
    arms, x, y = _events(0)
    embedded = _embedded(arms, x, y)
    part = _partition(arms, x, y, np.arange(len(arms)), np.random.default_rng(1))
    decider = _decider(sum_statistics([part], DIM))
    np.testing.assert_allclose(_errors(decider), _errors(embedded), rtol=1e-9)
    want = _selected(embedded)
    assert _selected(decider) == want
    # Not vacuous: context won for the contextual models, the mean for the others.
    assert {want[n] for n in CONTEXTUAL} == {1} and 0 in want.values()
    probe = np.random.default_rng(2).normal(size=(20, DIM))
    names, got = decider.probabilities(probe)
    assert names == embedded.probabilities(probe)[0]
    np.testing.assert_allclose(got, embedded.probabilities(probe)[1], atol=1e-6)
    assert got.max() < 1.0  # Thompson: the choice is a distribution
    # The sums alone (what the learners stored before) put every model on its mean.
    means_only = SelectiveThompson(DIM, seed=0, drift_delta=None)
    for name in MODELS:
        means_only.add_arm(name)
    plain = Policy.from_bytes(part.to_bytes(derived=False), as_class=LinUCB,
                              context_ridges=None)
    means_only.merge(recast(plain, SelectiveThompson,
                            **candidate_settings(means_only.config)))
    assert set(_selected(means_only).values()) == {0}


def test_partitions_sum_their_errors_and_skip_nothing() -> None:
    arms, x, y = _events(3)
    rng = np.random.default_rng(4)
    owner = rng.integers(3, size=len(arms))
    parts = [_partition(arms, x, y, np.flatnonzero(owner == p), rng) for p in range(3)]
    total = sum_statistics(parts[::-1], DIM)
    want = sum(_errors(p) for p in parts)
    np.testing.assert_allclose(_errors(total), want, rtol=1e-12)
    # Each partition's errors are its own events' predicted from its own events only:
    # one embedded select per partition (drift off) gives the same errors.
    for p, part in enumerate(parts):
        idx = np.flatnonzero(owner == p)
        alone = _embedded([arms[i] for i in idx], x[idx], y[idx])
        np.testing.assert_allclose(_errors(part), _errors(alone), rtol=1e-9)


def test_legacy_statistics_keep_sums_errors_start_afresh() -> None:
    arms, x, y = _events(5, n=300)
    legacy = LinUCB(DIM, drift_delta=None, decay_interval_s=0.0, seed=0)
    for name in MODELS:
        legacy.add_arm(name)
    legacy.update_batch(arms, x, y)
    carrier = as_carrier(Policy.from_bytes(legacy.to_bytes(derived=False)))
    assert candidate_settings(carrier.config) == candidate_settings(new_statistics(DIM).config)
    np.testing.assert_array_equal(carrier._stats.b_data, legacy._stats.b_data)  # noqa: SLF001
    assert not _errors(carrier).any()
    # It keeps learning, and merges with fresh carriers.
    carrier.update_batch(arms, x, y)
    assert _errors(carrier).all()
    total = sum_statistics([carrier, Policy.from_bytes(legacy.to_bytes())], DIM)
    assert total.observations(MODELS[0])["quality"] == 3 * legacy.observations(
        MODELS[0])["quality"]


def test_recast_other_kinds_carry_no_selection() -> None:
    arms, x, y = _events(6, n=300)
    part = _partition(arms, x, y, np.arange(len(arms)), np.random.default_rng(0))
    for cls in (LinUCB, SelectiveThompson):
        base = cls(DIM, seed=0)
        out = recast(part, cls, **candidate_settings(base.config))
        assert out._stats.sel_diag.shape == base._stats.sel_diag.shape  # noqa: SLF001
    # Other candidates (a tag block): their errors start afresh, the sums stay.
    tagged = SelectiveThompson(DIM, seed=0, tag_dims=2)
    out = recast(part, SelectiveThompson, **candidate_settings(tagged.config))
    assert out._stats.sel_err.shape == (len(MODELS), 4)  # noqa: SLF001
    assert not out._stats.sel_err.any()  # noqa: SLF001
