"""Request tags in the context: untagged contexts unchanged, tags stable and learnable,
bad tags refused naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from bandit import InvalidInputError, LinUCB
from bandit.featurize import MAX_TAGS, check_tags, make_featurizer, tag_vector, with_tags


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
