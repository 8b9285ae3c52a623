"""Tests of the prototype feature map (bandit.featurize.PrototypeMap and friends)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bandit import LinUCB, Preferences
from bandit.errors import InvalidInputError
from bandit.featurize import (
    Featurizer,
    HashingFeaturizer,
    PrototypeFeaturizer,
    PrototypeMap,
    spherical_kmeans,
)


def clustered(n: int, seed: int, d: int = 8, spread: float = 0.15):
    """Contexts around +e0, -e0, +e1, -e1; arm 0 is best on the e0 pair, arm 1 on the
    e1 pair (an XOR: no linear function of the raw context separates them)."""
    rng = np.random.default_rng(seed)
    centers = np.zeros((4, d))
    centers[0, 0], centers[1, 0], centers[2, 1], centers[3, 1] = 1, -1, 1, -1
    cluster = rng.integers(0, 4, n)
    x = centers[cluster] + spread * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    best = (cluster >= 2).astype(int)
    quality = np.where(np.arange(2)[None, :] == best[:, None], 0.9, 0.3)
    return x, quality


def online_reward(x: np.ndarray, quality: np.ndarray, seed: int) -> float:
    policy = LinUCB(x.shape[1], seed=seed)
    for arm in ("a0", "a1"):
        policy.add_arm(arm)
    prefs = Preferences(quality=1.0)
    got = []
    for t in range(x.shape[0]):
        j = int(policy.decide(x[t], prefs).arm[1])
        got.append(quality[t, j])
        policy.update(f"a{j}", x[t], {"quality": float(quality[t, j])})
    return float(np.mean(got[len(got) // 2:]))


def test_prototypes_beat_raw_linear_features_on_a_clustered_problem() -> None:
    x, quality = clustered(800, seed=1)
    unlabelled, _ = clustered(300, seed=2)  # prompts only: no outcomes
    pmap = PrototypeMap.fit(unlabelled, 4, temperature=0.1, seed=0)
    raw = online_reward(x, quality, 0)
    proto = online_reward(pmap.transform(x), quality, 0)
    # raw: a linear head cannot tell the e0 pair from the e1 pair (0.6 = half right,
    # ~0.71 with what the noise lets it pick up); prototypes: each cluster gets its own
    # coefficient (0.9 = always right).
    assert raw < 0.75
    assert proto > 0.85 and proto - raw > 0.1
    # concatenated with the raw vector it keeps the advantage
    both = PrototypeMap(pmap.prototypes, temperature=0.1, include_base=True)
    assert online_reward(both.transform(x), quality, 0) > 0.85


def test_spherical_kmeans_is_deterministic_and_finds_the_clusters() -> None:
    x, _ = clustered(400, seed=3)
    a = spherical_kmeans(x, 4, seed=7)
    b = spherical_kmeans(x, 4, seed=7)
    assert np.array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0)
    # every true center (+-e0, +-e1) has a centroid within cosine 0.95
    centers = np.zeros((4, 8))
    centers[0, 0], centers[1, 0], centers[2, 1], centers[3, 1] = 1, -1, 1, -1
    assert (np.max(centers @ a.T, axis=1) > 0.95).all()


def test_map_is_deterministic_unit_norm_and_zero_for_zero() -> None:
    x, _ = clustered(50, seed=4)
    pmap = PrototypeMap.fit(x, 5, seed=0)
    out = pmap.transform(x)
    assert out.shape == (50, 5) and pmap.dim == 5
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0)
    assert np.array_equal(out, pmap.transform(x))
    np.testing.assert_array_equal(pmap.transform(np.zeros(8)), np.zeros(5))
    # one row equals the batch's row (to rounding: BLAS may sum in another order)
    np.testing.assert_allclose(pmap.transform(x[3]), out[3], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(pmap.transform(x[3]), pmap.transform(x[3:4])[0])
    with_base = PrototypeMap(pmap.prototypes, include_base=True, mix=0.3)
    both = with_base.transform(x)
    assert both.shape == (50, 13)
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(both[:, :8], axis=1), np.sqrt(0.7))


def test_temperature_controls_how_hard_the_assignment_is() -> None:
    protos = np.eye(3)
    x = np.array([[0.8, 0.6, 0.0]])
    hard = PrototypeMap(protos, temperature=0.01).transform(x)[0]
    soft = PrototypeMap(protos, temperature=10.0).transform(x)[0]
    assert hard[0] > 0.999 and hard[1] < 1e-6
    assert soft.max() - soft.min() < 0.05


def test_round_trip_through_json_is_exact(tmp_path) -> None:
    x, _ = clustered(80, seed=5)
    pmap = PrototypeMap.fit(x, 6, temperature=0.07, include_base=True, mix=0.4, seed=1)
    again = PrototypeMap.from_dict(json.loads(json.dumps(pmap.to_dict())))
    assert again.spec == pmap.spec
    assert np.array_equal(again.transform(x), pmap.transform(x))
    path = tmp_path / "map.json"
    pmap.save(str(path))
    assert np.array_equal(PrototypeMap.load(str(path)).transform(x), pmap.transform(x))
    # the spec changes with the prototypes and with every parameter
    assert PrototypeMap(pmap.prototypes, temperature=0.08, include_base=True,
                        mix=0.4).spec != pmap.spec
    moved = pmap.prototypes.copy()
    moved[0, 0] += 1e-3
    assert PrototypeMap(moved, temperature=0.07, include_base=True, mix=0.4).spec != pmap.spec


def test_featurizer_wrapper_follows_the_protocol() -> None:
    base = HashingFeaturizer(dim=16)
    texts = ["sort a list in python", "reverse a python list", "translate into german",
             "translate into french", ""]
    pmap = PrototypeMap.fit(base.transform(texts), 2, seed=0)
    f = PrototypeFeaturizer(base, pmap)
    assert isinstance(f, Featurizer)
    out = f.transform(texts)
    assert out.shape == (5, 2) and f.dim == 2
    np.testing.assert_array_equal(out[4], np.zeros(2))  # empty text: no evidence
    np.testing.assert_array_equal(f.transform_one(texts[0]), f.transform(texts[:1])[0])
    np.testing.assert_allclose(f.transform_one(texts[0]), out[0], rtol=1e-12, atol=1e-15)
    assert f.spec.startswith(base.spec) and pmap.spec in f.spec
    with pytest.raises(InvalidInputError):
        PrototypeFeaturizer(HashingFeaturizer(dim=8), pmap)  # fitted on 16 dims


@pytest.mark.parametrize("kwargs", [
    {"prototypes": np.zeros((2, 3))},
    {"prototypes": np.array([[np.nan, 1.0]])},
    {"prototypes": np.ones(3)},
    {"prototypes": np.eye(2), "temperature": 0.0},
    {"prototypes": np.eye(2), "mix": 1.0},
    {"prototypes": np.eye(2), "include_base": 1},
])
def test_invalid_parameters_are_refused(kwargs) -> None:
    with pytest.raises(InvalidInputError):
        PrototypeMap(**kwargs)


def test_wrong_width_and_bad_dicts_are_refused() -> None:
    pmap = PrototypeMap(np.eye(3))
    with pytest.raises(InvalidInputError):
        pmap.transform(np.ones((2, 4)))
    with pytest.raises(InvalidInputError):
        PrototypeMap.from_dict({"type": "other"})
    with pytest.raises(InvalidInputError):
        PrototypeMap.from_dict({**pmap.to_dict(), "version": 99})
    with pytest.raises(InvalidInputError):
        spherical_kmeans(np.ones((3, 2)), 4)  # more clusters than rows
