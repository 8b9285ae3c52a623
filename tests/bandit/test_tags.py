"""Request tags in the context: untagged contexts unchanged, tags stable and learnable,
bad tags refused naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import InvalidInputError, LinUCB
from bandit.featurize import (
    MAX_TAGS,
    TAG_BLOCK_DIMS,
    TAG_BLOCK_NNZ,
    append_tag_block,
    check_tags,
    make_featurizer,
    tag_block,
    tag_vector,
    with_tags,
)


def test_with_tags_leaves_untagged_contexts_exactly_as_they_were() -> None:
    x = make_featurizer("hashing", 16).transform_one("reverse a list in python")
    assert with_tags(x, None) is x
    assert with_tags(x, {}) is x
    tagged = with_tags(x, {"app": "support-bot"})
    assert tagged.shape == x.shape and not np.allclose(tagged, x)


def test_tag_vector_is_stable_order_free_and_distinct() -> None:
    a = tag_vector({"app": "bot", "task": "code"}, 32)
    b = tag_vector({"task": "code", "app": "bot"}, 32)
    assert np.array_equal(a, b)
    assert np.linalg.norm(a) == pytest.approx(1.0)
    # A known value: the vector must not change between versions (stored statistics).
    assert tag_vector({"app": "bot"}, 4).tolist() == pytest.approx(
        [0.478452, 0.811242, 0.239122, -0.236199], abs=1e-6)
    others = [tag_vector({"app": f"app-{i}"}, 64) for i in range(20)]
    cosines = [abs(u @ v) for i, u in enumerate(others) for v in others[i + 1:]]
    assert max(cosines) < 0.6
    assert abs(tag_vector({"app": "x"}, 64) @ tag_vector({"task": "x"}, 64)) < 0.6


def test_tags_carry_a_signal_a_linear_policy_learns() -> None:
    # The same text, two apps: 'a' is good for one, 'b' for the other.
    x = make_featurizer("hashing", 16).transform_one("help me with this")
    policy = LinUCB(16, seed=0, epsilon=0.0)
    policy.add_arm("a")
    policy.add_arm("b")
    ctx = {app: with_tags(x, {"app": app}) for app in ("search", "support")}
    for _ in range(40):
        policy.update("a", ctx["search"], {"quality": 0.9})
        policy.update("b", ctx["search"], {"quality": 0.2})
        policy.update("a", ctx["support"], {"quality": 0.2})
        policy.update("b", ctx["support"], {"quality": 0.9})
    assert policy.decide(ctx["search"], explore=False).arm == "a"
    assert policy.decide(ctx["support"], explore=False).arm == "b"


@pytest.mark.parametrize(("tags", "field"), [
    ({"app": 3}, "tags.app"),
    ({"app": ""}, "tags.app"),
    ({"app": "x" * 129}, "tags.app"),
    ({"": "x"}, "tags key"),
    ({"a b": "x"}, "tags key"),
    ({"k" * 65: "x"}, "tags key"),
    ({f"k{i}": "v" for i in range(MAX_TAGS + 1)}, "tags"),
    (["app", "bot"], "tags"),
    ({"app": {"nested": "x"}}, "tags.app"),
])
def test_check_tags_refuses_bad_tags_naming_the_field(tags: object, field: str) -> None:
    with pytest.raises(InvalidInputError) as err:
        check_tags(tags)
    assert err.value.field == field
    assert "must" in err.value.allowed or "at most" in err.value.allowed


# ----------------------------------------------------------------- the tag block
def test_tag_block_is_stable_sparse_and_order_free() -> None:
    a = tag_block({"app": "bot", "task": "code"}, 16)
    assert np.array_equal(a, tag_block({"task": "code", "app": "bot"}, 16))
    assert np.linalg.norm(a) == pytest.approx(1.0)
    assert tag_block(None, 16).tolist() == [0.0] * 16 == tag_block({}, 16).tolist()
    one = tag_block({"app": "bot"}, 16)
    assert np.count_nonzero(one) == TAG_BLOCK_NNZ
    # A known value: the block must not change within tagblock-v1 (stored statistics).
    assert np.flatnonzero(one).tolist() == [11, 15]
    assert one[[11, 15]].tolist() == pytest.approx([-0.707107, 0.707107], abs=1e-6)
    blocks = {tuple(tag_block({"subject": f"s{i}"}, 16)) for i in range(57)}
    # 480 signed pairs of 16 coordinates: 57 subjects (MMLU's) share few patterns (the
    # birthday bound expects ~3 shared; one coordinate per pair would give ~25).
    assert len(blocks) >= 53


def test_append_tag_block_keeps_the_text_and_appends_zeros_without_tags() -> None:
    x = make_featurizer("hashing", 8).transform_one("reverse a list in python")
    assert append_tag_block(x, None, 4).tolist() == [*x.tolist(), 0.0, 0.0, 0.0, 0.0]
    tagged = append_tag_block(x, {"app": "a"}, 4)
    assert np.array_equal(tagged[:8], x) and np.linalg.norm(tagged[8:]) == pytest.approx(1)


def _two_app_policy(**params: object) -> LinUCB:
    policy = LinUCB(16 + params.pop("blocks", 0), seed=0, epsilon=0.0, **params)
    policy.add_arm("a")
    policy.add_arm("b")
    return policy


def _learn_two_apps(policy: LinUCB, ctx: dict[str, np.ndarray], rounds: int) -> None:
    for _ in range(rounds):
        for app, good in (("search", "a"), ("support", "b")):
            for arm in ("a", "b"):
                policy.update(arm, ctx[app], {"quality": 0.9 if arm == good else 0.2})


def _learned_gap(policy: LinUCB, ctx: dict[str, np.ndarray]) -> float:
    """How much of the true quality gap (0.7 each way) the policy predicts, on average."""
    gaps = []
    for app, (good, bad) in (("search", ("a", "b")), ("support", ("b", "a"))):
        pred = policy.predict(ctx[app])
        gaps.append(pred[good].quality - pred[bad].quality)
    return float(np.mean(gaps)) / 0.7


def test_tag_block_with_its_own_ridge_learns_a_tag_in_few_observations() -> None:
    # Same text for two apps; each app has its own best model. With the tags in their
    # own block under tag_ridge 1, five observations per app and arm learn most of the
    # gap; in the text's coordinates under the default context ridge (100), or in the
    # block under the text's ridge, hardly any of it.
    x = make_featurizer("hashing", 16).transform_one("help me with this")
    apps = ("search", "support")
    block = {app: append_tag_block(x, {"app": app}) for app in apps}
    own = _two_app_policy(blocks=TAG_BLOCK_DIMS, tag_dims=TAG_BLOCK_DIMS, tag_ridge=1.0)
    same_ridge = _two_app_policy(blocks=TAG_BLOCK_DIMS, tag_dims=TAG_BLOCK_DIMS,
                                 tag_ridge=100.0)
    shared = _two_app_policy()
    hashed = {app: with_tags(x, {"app": app}) for app in apps}
    for policy, ctx in ((own, block), (same_ridge, block), (shared, hashed)):
        _learn_two_apps(policy, ctx, rounds=5)
    assert _learned_gap(own, block) > 0.6
    assert _learned_gap(same_ridge, block) < 0.2
    assert _learned_gap(shared, hashed) < 0.2
    assert own.decide(block["search"], explore=False).arm == "a"
    assert own.decide(block["support"], explore=False).arm == "b"


@pytest.mark.parametrize("context_ridges", [None, (1.0, 1e6)])
def test_zero_tag_block_leaves_text_only_predictions_unchanged(context_ridges) -> None:
    # Untagged requests under a policy with a tag block: the block is zeros, so every
    # prediction and width equals a policy without the block (text-only never loses).
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    plain = LinUCB(8, seed=1, context_ridges=context_ridges)
    tagged = LinUCB(12, seed=1, tag_dims=4, tag_ridge=0.5, context_ridges=context_ridges)
    for policy in (plain, tagged):
        policy.add_arm("a")
        policy.add_arm("b")
    padded = np.concatenate([x, np.zeros((60, 4))], axis=1)
    for t in range(60):
        arm = "a" if t % 3 else "b"
        outcome = {"quality": float(0.5 + 0.4 * x[t, 0]), "cost_usd": 0.001}
        plain.update(arm, x[t], outcome)
        tagged.update(arm, padded[t], outcome)
    p, q = plain.decide_batch(x), tagged.decide_batch(padded)
    np.testing.assert_allclose(q.means, p.means, rtol=0, atol=1e-10)
    np.testing.assert_allclose(q.uncertainty, p.uncertainty, rtol=0, atol=1e-10)
    assert q.choices.tolist() == p.choices.tolist()


def test_tag_block_settings_survive_serialization() -> None:
    policy = _two_app_policy(blocks=TAG_BLOCK_DIMS, tag_dims=TAG_BLOCK_DIMS, tag_ridge=0.5)
    ctx = {app: append_tag_block(np.zeros(16), {"app": app}) for app in ("search", "support")}
    _learn_two_apps(policy, ctx, rounds=3)
    restored = LinUCB.from_bytes(policy.to_bytes())
    assert (restored.config.tag_dims, restored.config.tag_ridge) == (TAG_BLOCK_DIMS, 0.5)
    for app in ctx:
        assert restored.predict(ctx[app]) == policy.predict(ctx[app])


@pytest.mark.parametrize(("params", "field"), [
    ({"tag_dims": 8}, "tag_dims"),
    ({"tag_dims": -1}, "tag_dims"),
    ({"tag_dims": True}, "tag_dims"),
    ({"tag_dims": 2.0}, "tag_dims"),
    ({"tag_dims": 2, "tag_ridge": 0.0}, "tag_ridge"),
    ({"tag_dims": 2, "tag_ridge": float("nan")}, "tag_ridge"),
])
def test_bad_tag_block_settings_are_refused_naming_the_field(params, field) -> None:
    with pytest.raises(InvalidInputError) as err:
        LinUCB(8, **params)
    assert err.value.field == field


def test_tag_ridges_select_the_tags_for_arms_they_predict() -> None:
    # Candidates "no tags" (1e6, first: the choice before any data) and "tags at ridge
    # 1": where the app decides the quality, the prequential error picks the tags.
    x = make_featurizer("hashing", 16).transform_one("help me with this")
    block = {app: append_tag_block(x, {"app": app}) for app in ("search", "support")}
    policy = _two_app_policy(blocks=TAG_BLOCK_DIMS, tag_dims=TAG_BLOCK_DIMS,
                             tag_ridges=(1e6, 1.0))
    _learn_two_apps(policy, block, rounds=10)
    assert policy._stats.selected().tolist() == [1, 1]
    assert _learned_gap(policy, block) > 0.6


@pytest.mark.parametrize(("params", "field"), [
    ({"tag_ridges": (1.0, 1e6)}, "tag_ridges"),
    ({"tag_dims": 2, "tag_ridges": ()}, "tag_ridges"),
    ({"tag_dims": 2, "tag_ridges": (1.0,) * 5}, "tag_ridges"),
    ({"tag_dims": 2, "tag_ridges": (1.0, -1.0)}, "tag_ridges[1]"),
])
def test_bad_tag_ridges_are_refused_naming_the_field(params, field) -> None:
    with pytest.raises(InvalidInputError) as err:
        LinUCB(8, **params)
    assert err.value.field == field
