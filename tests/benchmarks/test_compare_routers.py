"""AIQ and the full-information kNN router of benchmarks/compare_routers.py, on tiny
generated data (no ../shared)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

# ``benchmarks`` is not an installed package; make the repository root importable.
_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
cr = importlib.import_module("benchmarks.compare_routers")


def test_aiq_single_point_is_flat_from_its_cost() -> None:
    # One point at cost 1, quality 0.5, range [0, 2]: 0 below cost 1, 0.5 above.
    assert cr.aiq(np.array([[1.0, 0.5]]), 0.0, 2.0) == pytest.approx(0.25, abs=1e-12)


def test_aiq_drops_points_below_the_hull() -> None:
    # (1, 0.3) lies under the chord from (0, 0.2) to (2, 0.6): the hull ignores it.
    with_dip = cr.aiq(np.array([[0.0, 0.2], [1.0, 0.3], [2.0, 0.6]]), 0.0, 2.0)
    assert with_dip == pytest.approx(0.4, abs=1e-12)
    # A point above the chord raises the area by exactly its triangle: 0.5*2*0.1 / 2.
    bump = cr.aiq(np.array([[0.0, 0.2], [1.0, 0.5], [2.0, 0.6]]), 0.0, 2.0)
    assert bump == pytest.approx(0.45, abs=1e-12)


def test_aiq_nondecreasing_keeps_best_quality_beyond_its_peak() -> None:
    # Spending more for less quality is never forced: after the peak the curve is flat.
    pts = np.array([[0.0, 0.4], [1.0, 0.8], [2.0, 0.5]])
    hull = cr.nondecreasing_hull(pts)
    np.testing.assert_allclose(hull, [[0.0, 0.4], [1.0, 0.8]])
    # area: (0.4 + 0.8) / 2 over [0, 1], then 0.8 over [1, 2]; divided by 2
    assert cr.aiq(pts, 0.0, 2.0) == pytest.approx((0.6 + 0.8) / 2, abs=1e-12)


def test_aiq_clips_to_the_single_model_cost_range() -> None:
    pts = np.array([[0.0, 0.0], [4.0, 1.0]])
    # on [1, 3] the line q = c / 4 averages 0.5
    assert cr.aiq(pts, 1.0, 3.0) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="c_max"):
        cr.aiq(pts, 2.0, 2.0)


def test_aiq_oracle_like_router_beats_a_dominated_one() -> None:
    good = np.array([[0.1, 0.7], [0.5, 0.9]])
    bad = np.array([[0.3, 0.6], [1.0, 0.7]])
    assert cr.aiq(good, 0.1, 1.0) > cr.aiq(bad, 0.1, 1.0) + 0.2


def _clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two clusters of contexts; model 0 is right on cluster A, model 1 on cluster B."""
    rng = np.random.default_rng(seed)
    side = rng.integers(0, 2, n)
    centers = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    x = centers[side] + 0.1 * rng.standard_normal((n, 3))
    rewards = np.where(side[:, None] == np.arange(2)[None, :], 0.9, 0.1)
    rewards = rewards + 0.05 * rng.standard_normal((n, 2))
    return x, rewards


def test_knn_routes_each_cluster_to_its_model() -> None:
    x_tr, r_tr = _clusters(400, seed=1)
    x_te, r_te = _clusters(200, seed=2)
    choices = cr.knn_choices(x_tr, r_tr, x_te, k=15)
    truth = np.argmax(r_te, axis=1)
    assert (choices == truth).mean() >= 0.97


def test_knn_scores_are_the_mean_over_the_k_nearest() -> None:
    x_tr = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    r_tr = np.array([[1.0, 0.0], [0.5, 0.2], [0.0, 1.0], [0.2, 0.6]])
    scores = cr.knn_scores(x_tr, r_tr, np.array([[1.0, 0.05], [0.0, 2.0]]), k=2)
    np.testing.assert_allclose(scores, [[0.75, 0.1], [0.1, 0.8]], atol=1e-12)
    # cosine: the scale of a context does not matter, a zero context is no one's neighbour
    zero = cr.knn_scores(x_tr, r_tr, np.zeros((1, 2)), k=4)
    np.testing.assert_allclose(zero, [r_tr.mean(axis=0)], atol=1e-12)


def test_knn_beats_every_single_model_and_random_on_clustered_data() -> None:
    x_tr, r_tr = _clusters(300, seed=3)
    x_te, r_te = _clusters(300, seed=4)
    choices = cr.knn_choices(x_tr, r_tr, x_te, k=10)
    knn_reward = r_te[np.arange(len(choices)), choices].mean()
    assert knn_reward > r_te.mean(axis=0).max() + 0.3


def test_run_online_eps_greedy_finds_the_better_model() -> None:
    rng = np.random.default_rng(0)
    n = 600
    quality = np.column_stack([rng.binomial(1, 0.8, n), rng.binomial(1, 0.3, n)]).astype(float)
    cost = np.tile([1e-3, 1e-4], (n, 1))
    router = cr.EpsGreedy(2, seed=0)
    choices = cr.run_online(router, quality, cost, np.zeros(n))
    assert (choices[200:] == 0).mean() >= 0.9


def test_aiq_anchor_lets_a_router_mix_with_the_cheapest_model() -> None:
    # A router seen only at cost 1 (quality 0.5) can mix with the cheapest model
    # (cost 0, quality 0.1): the line from 0.1 to 0.5 over [0, 1], then 0.5 up to 2.
    pts = np.array([[1.0, 0.5]])
    assert cr.aiq(pts, 0.0, 2.0) == pytest.approx(0.25, abs=1e-12)
    assert cr.aiq(pts, 0.0, 2.0, anchor=(0.0, 0.1)) == pytest.approx(0.4, abs=1e-12)
    # An anchor above the router's curve dominates it where it is better.
    assert cr.aiq(pts, 0.0, 2.0, anchor=(0.0, 0.6)) == pytest.approx(0.6, abs=1e-12)
