"""SelectiveThompson: context admitted per arm only where it has predicted (issue 13).

The contract tests (clone, round trip, merge, forgetting, propensities, bad input) run
over it in tests/bandit/test_policies.py and test_ridge_selection.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from bandit import InvalidInputError, LinearThompson, Policy, Preferences, SelectiveThompson
from bandit.featurize import append_tag_block
from bandit.select import MEAN_ONLY_RIDGE

TAG_DIMS = 16


def test_config_defaults_nested_models():
    assert SelectiveThompson(4).config.context_ridges == (MEAN_ONLY_RIDGE, 100.0)
    assert SelectiveThompson(4, context_ridge=30.0).config.context_ridges == (
        MEAN_ONLY_RIDGE, 30.0)
    assert SelectiveThompson(4).config.tag_ridges is None  # no tag block, no tag models
    tagged = SelectiveThompson(20, tag_dims=TAG_DIMS, tag_ridge=3.0).config
    assert tagged.tag_ridges == (MEAN_ONLY_RIDGE, 3.0)
    explicit = SelectiveThompson(4, context_ridges=(MEAN_ONLY_RIDGE, 10.0, 1.0)).config
    assert explicit.context_ridges == (MEAN_ONLY_RIDGE, 10.0, 1.0)
    # Restored from a JSON header (lists), the candidates are tuples again.
    restored = SelectiveThompson(4, context_ridges=[MEAN_ONLY_RIDGE, 5.0]).config
    assert restored.context_ridges == (MEAN_ONLY_RIDGE, 5.0)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"context_ridges": (0.0, 1.0)}, "context_ridges[0]"),
        ({"context_ridges": ()}, "context_ridges"),
        ({"context_ridge": "high"}, "context_ridge"),
        ({"tag_ridges": (1.0,)}, "tag_ridges"),  # no tag block to select on
        ({"tag_dims": TAG_DIMS, "tag_ridge": -1.0}, "tag_ridge"),
        ({"epsilon": 2.0}, "epsilon"),
        ({"scale": -0.5}, "scale"),
    ],
)
def test_construct_bad_config_raises_naming_field(params, field):
    with pytest.raises(InvalidInputError) as err:
        SelectiveThompson(20, **params)
    assert err.value.field == field
    assert field in str(err.value)


def _play(policy: Policy, x: np.ndarray, quality: np.ndarray, seed: int) -> np.ndarray:
    """One pass under bandit feedback (noisy 0/1 outcomes): the choices."""
    rng = np.random.default_rng(seed)
    arms = policy.arms
    choices = np.empty(len(x), dtype=np.intp)
    for t in range(len(x)):
        j = arms.index(policy.decide(x[t]).arm)
        choices[t] = j
        policy.update(arms[j], x[t], {"quality": float(rng.random() < quality[t, j])})
    return choices


def _topics(seed: int, n: int, dim: int = 8):
    """Two tagged topics, arm a best on one and arm b on the other; the text is noise."""
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, 2, n)
    text = rng.standard_normal((n, dim)) / np.sqrt(dim)
    x = np.stack([append_tag_block(row, {"task": f"t{k}"}, TAG_DIMS)
                  for row, k in zip(text, topic, strict=True)])
    quality = np.where(topic[:, None] == 0, [0.8, 0.4], [0.4, 0.8])
    return x, quality, topic


def test_select_routes_by_tag_where_it_predicts():
    x, quality, topic = _topics(0, 1500)
    policy = SelectiveThompson(x.shape[1], tag_dims=TAG_DIMS, seed=1, drift_delta=None)
    policy.add_arm("a")
    policy.add_arm("b")
    choices = _play(policy, x, quality, seed=2)
    best = topic  # arm 0 on topic 0, arm 1 on topic 1
    late = slice(1000, None)
    assert (choices[late] == best[late]).mean() > 0.85
    # Both arms moved to a model with the tags (the text stays out: it is noise).
    grid = policy._stats.sel_diag  # (models, D): ridge of text, tags, bias
    for g in policy._stats.selected():
        assert grid[g, -2] < MEAN_ONLY_RIDGE  # tag coordinates free
        assert grid[g, 0] == MEAN_ONLY_RIDGE  # text coordinates held at 0


def test_select_ignores_context_without_signal():
    """Noise contexts, one arm better on average: that arm stays on its mean, so its
    prediction is the same for every context, and it gets the traffic."""
    rng = np.random.default_rng(3)
    n, dim = 1200, 8
    x = rng.standard_normal((n, dim)) / np.sqrt(dim)
    quality = np.tile([0.7, 0.5], (n, 1))
    policy = SelectiveThompson(dim, seed=4, drift_delta=None)
    policy.add_arm("a")
    policy.add_arm("b")
    choices = _play(policy, x, quality, seed=5)
    # The arm with the traffic is on its mean (b, with few pulls, may be either: both
    # of its models are near its mean at the text's ridge).
    assert policy._stats.selected()[0] == 0
    predicted = [policy.predict(row)["a"].quality for row in x[:20]]
    assert max(predicted) - min(predicted) < 1e-4  # ridge 1e6: the text all but off
    assert (choices[-300:] == 0).mean() > 0.9
    # The same stream, every arm on its text model from the start (plain Thompson at the
    # same ridge): the prediction of a moves with a context that carries nothing.
    plain = LinearThompson(dim, seed=4, drift_delta=None)
    plain.add_arm("a")
    plain.add_arm("b")
    _play(plain, x, quality, seed=5)
    moved = [plain.predict(row)["a"].quality for row in x[:20]]
    assert max(moved) - min(moved) > 1e-3


def test_propensity_floor_keeps_every_arm_reachable():
    """With ``epsilon`` set, once one arm dominates every arm still has at least
    epsilon / K probability: the logged decisions can evaluate other policies."""
    rng = np.random.default_rng(6)
    policy = SelectiveThompson(3, seed=7, drift_delta=None, epsilon=0.01)
    for name in ("a", "b", "c"):
        policy.add_arm(name)
    for _ in range(300):
        row = rng.standard_normal(3)
        policy.update("a", row, {"quality": 0.95})
        policy.update("b", row, {"quality": 0.05})
        policy.update("c", row, {"quality": 0.05})
    names, probs = policy.probabilities(rng.standard_normal((5, 3)), Preferences())
    assert names == ["a", "b", "c"]
    assert probs.min() >= 0.01 / 3 - 1e-12
    assert probs[:, 0].min() > 0.97
