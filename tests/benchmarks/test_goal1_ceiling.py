"""benchmarks/goal1_ceiling.py and compare_routers.quality_at_cost on tiny generated data
(no ../shared)."""

from __future__ import annotations

import doctest
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

_ROOT = Path(__file__).resolve().parents[2]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
cr = importlib.import_module("benchmarks.compare_routers")
g1 = importlib.import_module("benchmarks.goal1_ceiling")


def test_doctests() -> None:
    for module in (cr, g1):
        result = doctest.testmod(module)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_quality_at_cost_mixes_two_operating_points() -> None:
    pts = np.array([[0.1, 0.50], [0.3, 0.70], [0.2, 0.55]])  # (0.2, 0.55) under the chord
    assert cr.quality_at_cost(pts, 0.2) == pytest.approx(0.60, abs=1e-12)
    assert cr.quality_at_cost(pts, 0.25) == pytest.approx(0.65, abs=1e-12)
    # below the cheapest point only the anchor (the cheapest single model) helps
    assert np.isnan(cr.quality_at_cost(pts, 0.05))
    assert cr.quality_at_cost(pts, 0.05, anchor=(0.0, 0.3)) == pytest.approx(0.4, abs=1e-12)


def _dataset(n_train: int = 3000, n_test: int = 600, seed: int = 0):
    """Three models; model 0 (dear) is right everywhere, model 1 (cheap) only where
    x[0] = 1, model 2 (cheap) nowhere: a router that reads x can match model 0's quality
    at about half its cost."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    easy = rng.random(n) < 0.6
    x = np.column_stack([easy, ~easy, rng.standard_normal((n, 2))]).astype(np.float64)
    quality = np.stack([np.full(n, 0.9), np.where(easy, 0.9, 0.1), np.full(n, 0.2)], axis=1)
    quality = np.clip(quality + 0.05 * rng.standard_normal((n, 3)), 0.0, 1.0)
    cost = np.tile([1e-3, 1e-4, 1e-4], (n, 1))
    ds = cr.Dataset("toy", ["dear", "cheap-half", "cheap-bad"], quality, cost, n_train)
    return ds, x


def test_full_info_meets_the_goal_and_a_blind_router_does_not() -> None:
    ds, x = _dataset()
    fams = g1.families(ds, x, "raw", [0.0, 100.0, 300.0], ks=[1, 3], seeds=2,
                       online_seeds=0)
    assert [f.kind for f in fams] == ["full-info", "ideal-1", "ideal-3"]
    test = slice(ds.test_start, ds.n)
    q, c = ds.quality[test], ds.cost[test]
    res = {f.kind: g1.evaluate(f, q, c, best=0, cheapest=1, reps=200) for f in fams}
    # full information learns x[0] = 1 -> cheap model: model 0's quality at ~46% cost
    assert res["full-info"]["gap"] > -0.02
    assert res["full-info"]["share_met"] > 0.2
    # ideal-1 only ever sees (and routes to) the top model: it cannot get to half cost
    # except by mixing with the cheapest model, 0.32 worse on average, on > 55% of rows
    ideal1 = fams[1]
    assert np.allclose(ideal1.cost, 1e-3)
    assert res["ideal-1"]["gap"] < -0.1 and res["ideal-1"]["share_met"] == 0.0
    # ideal-3 explores every model: with ~1,000 outcomes each it learns the split too
    assert res["ideal-3"]["gap"] > -0.03


def test_ridge_heads_use_only_each_models_rows() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 2))
    rewards = np.stack([x[:, 0], -x[:, 0], np.zeros(400)], axis=1)
    arm = np.where(np.arange(400) % 2 == 0, 0, 1)
    # model 1's rewards on model 0's rows are corrupted: a head that read them would show it
    corrupted = rewards.copy()
    corrupted[arm == 0, 1] = 100.0
    theta = g1.ridge_heads(x, corrupted, arm, np.array([0, 1]), ridge=1e-6)
    np.testing.assert_allclose(theta[:, 0], [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(theta[:, 1], [-1.0, 0.0, 0.0], atol=1e-6)
    assert theta[-1, 2] < -1e8  # model 2 is out of the allocation: never chosen
