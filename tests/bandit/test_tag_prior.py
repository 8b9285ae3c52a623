"""The tag block's prior strength learned from the data (bandit/tagprior.py): weak where
tags matter, strong where they do not, kept through a restore and a merge, bad settings
refused naming the field, untagged requests unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import InvalidInputError, SelectiveThompson
from bandit.featurize import TAG_BLOCK_DIMS, append_tag_block
from bandit.tagprior import learned_tag_ridge

TEXT = 8


def _policy(seed: int = 0, **params: object) -> SelectiveThompson:
    policy = SelectiveThompson(TEXT + TAG_BLOCK_DIMS, seed=seed, tag_dims=TAG_BLOCK_DIMS,
                               **params)
    policy.add_arm("a")
    policy.add_arm("b")
    return policy


def _context(rng: np.random.Generator, tag: str) -> np.ndarray:
    text = rng.standard_normal(TEXT)
    return append_tag_block(text / np.linalg.norm(text), {"app": tag})


def _run(policy: SelectiveThompson, tags: list[str], quality, seed: int) -> dict[str, int]:
    """One online pass: the policy chooses, learns the chosen arm's Bernoulli quality
    (``quality(arm, tag)``); returns the calls of each arm."""
    rng = np.random.default_rng(seed)
    calls = {"a": 0, "b": 0}
    for tag in tags:
        x = _context(rng, tag)
        arm = policy.decide(x).arm
        calls[arm] += 1
        q = float(rng.random() < quality(arm, tag))
        policy.update(arm, x, {"quality": q, "cost_usd": 0.001})
    return calls


def test_learned_tag_prior_is_weak_where_tags_matter_and_routes_each_tag() -> None:
    # Three apps, each with its own best model by a wide margin: a weak ridge (the tags
    # learned from few calls) and the right model per app.
    best = {"search": "a", "support": "b", "code": "a"}
    rng = np.random.default_rng(7)
    tags = rng.choice(list(best), 600).tolist()
    policy = _policy(tag_prior="learned")
    _run(policy, tags, lambda arm, tag: 0.9 if best[tag] == arm else 0.2, seed=1)
    assert policy.tag_ridge <= 0.5  # weaker than the fixed default, 1
    for tag, arm in best.items():
        assert policy.decide(_context(rng, tag), explore=False).arm == arm


def test_learned_tag_prior_is_strong_where_tags_do_not_change_the_choice() -> None:
    # 40 tag values in blocks of 50 rows (a new one every 50: MMLU's subjects in file
    # order), each a difficulty both models share (sd 0.1 of quality), 'a' better by
    # 0.15 everywhere: the tags predict each model's quality, not which is better. The
    # learned ridge grows strong, and the worse model gets far fewer calls than at the
    # fixed ridge 1, whose wide prior explores both models on every new tag.
    difficulty = np.random.default_rng(5).normal(0.0, 0.1, 40)
    tags = [f"subject-{i // 50}" for i in range(2000)]

    def quality(arm: str, tag: str) -> float:
        return float(np.clip((0.8 if arm == "a" else 0.65)
                             + difficulty[int(tag.split("-")[1])], 0.0, 1.0))

    worse = {"fixed": 0, "learned": 0}
    ridges = []
    for seed in range(3):
        for prior in worse:
            policy = _policy(seed, tag_prior=prior)
            worse[prior] += _run(policy, tags, quality, seed=10 + seed)["b"]
            if prior == "learned":
                ridges.append(policy.tag_ridge)
    assert min(ridges) >= 10.0
    assert worse["learned"] < 0.6 * worse["fixed"], worse


def _trained(seed: int = 0, rows: int = 300, **params: object) -> SelectiveThompson:
    policy = _policy(seed, tag_prior="learned", **params)
    tags = [f"t{i % 5}" for i in range(rows)]
    _run(policy, tags, lambda arm, tag: 0.3 + 0.1 * int(tag[1:]) if arm == "a" else 0.5,
         seed=seed + 100)
    return policy


@pytest.mark.parametrize("derived", [True, False])
def test_learned_tag_prior_survives_a_restore(derived: bool) -> None:
    policy = _trained()
    assert policy.tag_ridge != 1.0  # learned, not the configured start
    restored = SelectiveThompson.from_bytes(policy.to_bytes(derived=derived))
    assert restored.tag_ridge == policy.tag_ridge
    ctx = np.stack([_context(np.random.default_rng(i), f"t{i % 5}") for i in range(20)])
    np.testing.assert_allclose(restored.decide_batch(ctx).means,
                               policy.decide_batch(ctx).means, rtol=0, atol=1e-9)
    # Same seed, same state: the same decisions on.
    assert [restored.decide(x).arm for x in ctx] == [policy.decide(x).arm for x in ctx]


def test_learned_tag_prior_of_a_merge_is_that_of_the_merged_sums() -> None:
    left, right = _trained(1), _trained(2)
    merged = left.merge(right)
    assert merged.tag_ridge == learned_tag_ridge(merged._stats, TAG_BLOCK_DIMS, 1.0)


def test_learned_tag_prior_leaves_untagged_requests_as_text_only() -> None:
    # Zeros in the block: the evidence has nothing to weigh, the ridge stays, and every
    # prediction is that of the policy without the block.
    rng = np.random.default_rng(3)
    plain = SelectiveThompson(TEXT, seed=1)
    tagged = SelectiveThompson(TEXT + TAG_BLOCK_DIMS, seed=1, tag_dims=TAG_BLOCK_DIMS,
                               tag_prior="learned")
    for policy in (plain, tagged):
        policy.add_arm("a")
        policy.add_arm("b")
    x = rng.standard_normal((200, TEXT))
    padded = np.concatenate([x, np.zeros((200, TAG_BLOCK_DIMS))], axis=1)
    for t in range(200):
        outcome = {"quality": float(0.5 + 0.4 * np.tanh(x[t, 0])), "cost_usd": 0.001}
        plain.update("a" if t % 3 else "b", x[t], outcome)
        tagged.update("a" if t % 3 else "b", padded[t], outcome)
    assert tagged.tag_ridge == 1.0
    p, q = plain.decide_batch(x[:50]), tagged.decide_batch(padded[:50])
    np.testing.assert_allclose(q.means, p.means, rtol=0, atol=1e-10)
    np.testing.assert_allclose(q.uncertainty, p.uncertainty, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("params", "field"), [
    ({"tag_prior": "auto"}, "tag_prior"),
    ({"tag_prior": None}, "tag_prior"),
    ({"tag_prior": "learned", "tag_ridges": (1.0, 10.0)}, "tag_ridges"),
    ({"tag_prior": "learned", "tag_ridges": (1e6,)}, "tag_ridges"),
])
def test_bad_tag_prior_settings_are_refused_naming_the_field(params, field) -> None:
    with pytest.raises(InvalidInputError) as err:
        SelectiveThompson(TEXT + TAG_BLOCK_DIMS, tag_dims=TAG_BLOCK_DIMS, **params)
    assert err.value.field == field
    assert "allowed" in str(err.value) or "must" in str(err.value)


@pytest.mark.parametrize("tag", [None, "one"])
def test_learned_tag_prior_is_estimated_again_only_when_the_weight_moves_by_10pct(
        tag, monkeypatch) -> None:
    """Untagged traffic or a single tag value: the estimate finds nothing, and is still
    taken only every 10% of quality weight (docs/policies.md), not on every update."""
    import bandit.select

    calls = []

    def counting(stats, *args):
        calls.append(float(stats.weight[:, 0].sum()))
        return learned_tag_ridge(stats, *args)

    monkeypatch.setattr(bandit.select, "learned_tag_ridge", counting)
    policy = _policy(tag_prior="learned")
    rng = np.random.default_rng(0)
    for t in range(1000):
        x = _context(rng, "one")
        if tag is None:
            x[TEXT:] = 0.0
        policy.update("ab"[t % 2], x, {"quality": float(rng.random())})
    assert policy.tag_ridge == policy.config.tag_ridge
    taken = [w for w in calls if w >= 50.0]
    # 50 -> 1000 in steps of at least 10%: log(20) / log(1.1) ~ 31 estimates.
    assert 25 <= len(taken) <= 33
    assert all(b / a >= 1.1 - 1e-9 for a, b in zip(taken, taken[1:], strict=False))


def test_learned_state_restored_with_a_fixed_tag_prior_is_recomputed() -> None:
    """``from_bytes(..., tag_prior="fixed")`` of a learned state: its stored inverses
    were taken under the learned ridge; restored, it predicts as the same sums
    recomputed under the configured one."""
    from bandit import Policy

    policy = _policy(tag_prior="learned")
    _run(policy, [str(i % 3) for i in range(600)],
         lambda arm, tag: 0.2 + 0.3 * int(tag) * (arm == "b"), seed=0)
    assert policy.tag_ridge != policy.config.tag_ridge
    stored = Policy.from_bytes(policy.to_bytes(), tag_prior="fixed")
    recomputed = Policy.from_bytes(policy.to_bytes(derived=False), tag_prior="fixed")
    rng = np.random.default_rng(1)
    for tag in ("0", "1", "2", "new"):
        x = _context(rng, tag)
        got, want = stored.predict(x), recomputed.predict(x)
        for arm in ("a", "b"):
            assert got[arm].quality == pytest.approx(want[arm].quality, abs=1e-9)
            assert got[arm].uncertainty == pytest.approx(want[arm].uncertainty, abs=1e-9)
