"""A model added mid-stream gets its cold start on every tag value it is asked about
(``cold_start_by="added-on-tags"``, the default, or ``"tags"`` for every model), not on
whichever requests come first; the models there from the start decide as counted in
total (``"arm"``)."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest

from bandit import InvalidInputError, Policy, Preferences, SelectiveThompson
from bandit.featurize import tag_block

TEXT, TAGS = 4, 16
APPS = 8  # tag values; the specialist is best on the last one
ADD_AT = 300
PREFS = Preferences(quality=1.0, cost=0.0)


def context(rng: np.random.Generator, app: int | None) -> np.ndarray:
    tags = None if app is None else {"app": str(app)}
    return np.r_[0.1 * rng.standard_normal(TEXT), tag_block(tags, TAGS)]


def quality(arm: str, app: int) -> float:
    """Three general models; ``new`` is useless except on the last app, where it is
    the best by far."""
    if arm == "new":
        return 0.85 if app == APPS - 1 else 0.1
    return {"a": 0.7, "b": 0.5, "c": 0.4}[arm]


def specialist_share(seed: int, **config: object) -> float:
    """The new model's share of its app's requests 200-300 after it was added."""
    rng = np.random.default_rng(seed)
    policy = SelectiveThompson(TEXT + TAGS, seed=seed, tag_dims=TAGS, **config)
    for arm in ("a", "b", "c"):
        policy.add_arm(arm)
    own, picks = 0, []
    t = 0
    while own < 300:
        if t == ADD_AT:
            policy.add_arm("new")
        app = int(rng.integers(APPS))
        x = context(rng, app)
        arm = policy.decide(x, PREFS).arm
        q = float(np.clip(quality(arm, app) + 0.1 * rng.standard_normal(), 0.0, 1.0))
        policy.update(arm, x, {"quality": q})
        if t >= ADD_AT and app == APPS - 1:
            own += 1
            if own > 200:
                picks.append(arm == "new")
        t += 1
    return float(np.mean(picks))


def test_new_model_best_for_one_tag_wins_that_tags_traffic():
    # Counted in total, the new model's 10 cold-start calls land ~1 on its own app; it
    # learns its (low) mean elsewhere and is seldom tried there again.
    by_tags = [specialist_share(seed, cold_start_by="tags") for seed in range(3)]
    assert min(by_tags) >= 0.5, by_tags
    by_arm = [specialist_share(seed, cold_start_by="arm") for seed in range(3)]
    assert sum(s >= 0.5 for s in by_arm) <= 1, by_arm


def test_default_config_spreads_a_late_models_cold_start_over_the_tags():
    # "added-on-tags", the default: the new model was added after the others learned.
    by_default = [specialist_share(seed) for seed in range(3)]
    assert min(by_default) >= 0.5, by_default


def test_new_on_tags_spreads_a_new_models_cold_start_only():
    # The same stream: the new model (10 observations in total) is newer than its app.
    assert min(specialist_share(seed, cold_start_by="new-on-tags") for seed in range(3)) >= 0.5
    # An old model that has seen more in total than anyone has of a tag is not cold on
    # it, though it has fewer than 10 observations there.
    policy, rng = warmed(cold_start_by="new-on-tags")
    for _ in range(300):
        policy.update("new", context(rng, 0), {"quality": 0.1}, now=12_000.0)
    assert new_share(policy, context(rng, 3)) < 0.01
    fresh, rng = warmed(cold_start_by="new-on-tags")
    assert 0.07 < new_share(fresh, context(rng, 3)) < 0.13


def warmed(seed: int = 0, **config: object) -> tuple[SelectiveThompson, np.random.Generator]:
    """Three warm models and a new one with 10 calls on app 0 only (warm in total)."""
    rng = np.random.default_rng(seed)
    config.setdefault("cold_start_by", "tags")
    policy = SelectiveThompson(TEXT + TAGS, seed=seed, tag_dims=TAGS, drift_delta=None,
                               **config)
    for arm in ("a", "b", "c"):
        policy.add_arm(arm)
    for t in range(200):
        app = t % APPS
        for arm in ("a", "b", "c"):
            policy.update(arm, context(rng, app), {"quality": quality(arm, app)},
                          now=60.0 * t)
    policy.add_arm("new")
    for _ in range(10):
        policy.update("new", context(rng, 0), {"quality": 0.1}, now=12_000.0)
    return policy, rng


def new_share(policy: Policy, x: np.ndarray) -> float:
    batch = policy.decide_batch(np.repeat(x[None], 4000, axis=0), PREFS)
    return float(np.mean(batch.choices == batch.arms.index("new")))


def test_warm_model_keeps_its_cold_start_share_on_other_tags_only():
    policy, rng = warmed()
    # Warm on app 0 (and in total): the main branch alone, where it scored 0.1.
    assert new_share(policy, context(rng, 0)) < 0.01
    # Cold on app 3: the cold-start share (10%).
    assert 0.07 < new_share(policy, context(rng, 3)) < 0.13
    arm = SelectiveThompson(TEXT + TAGS, seed=0, tag_dims=TAGS, cold_start_by="arm")
    for name in policy.arms:  # the same sums, counted in total: warm everywhere
        arm.add_arm(name)
    arm._stats = policy._stats
    assert new_share(arm, context(rng, 3)) < 0.01


def test_untagged_requests_decide_exactly_as_counted_in_total():
    tagged, _ = warmed(seed=4)
    total, _ = warmed(seed=4, cold_start_by="arm")
    x = np.hstack([0.1 * np.random.default_rng(5).standard_normal((64, TEXT)),
                   np.zeros((64, TAGS))])
    tagged.add_arm("newer")  # cold in total: the usual cold start on untagged requests
    total.add_arm("newer")
    a, b = tagged.decide_batch(x, PREFS), total.decide_batch(x, PREFS)
    np.testing.assert_array_equal(a.choices, b.choices)
    np.testing.assert_array_equal(a.propensities, b.propensities)


def test_counts_survive_round_trip_merge_and_forgetting():
    policy, rng = warmed()
    x = context(rng, 3)
    restored = Policy.from_bytes(policy.to_bytes())
    assert new_share(restored, x) == pytest.approx(new_share(policy, x), abs=0.03)
    lean = Policy.from_bytes(policy.to_bytes(derived=False))
    assert 0.07 < new_share(lean, x) < 0.13
    # A state saved before cold_start_by (and the late flag) existed loads with the
    # default and no arm added late: it decides as it did ("arm").
    old = edited_state(policy, lambda header: (header["config"].pop("cold_start_by"),
                                               header.pop("late")))
    assert old.config.cold_start_by == "added-on-tags" and old.late_arms == []
    assert new_share(old, x) < 0.01
    # Merge: a replica that called the new model 10 times on app 3 makes it warm there.
    other = SelectiveThompson(TEXT + TAGS, seed=1, tag_dims=TAGS, drift_delta=None)
    other.add_arm("new")
    for _ in range(10):
        other.update("new", x, {"quality": 0.1}, now=12_000.0)
    policy.merge(other)
    assert new_share(policy, x) < 0.01
    # Forgetting: its data on app 3 decays below 10 observations: cold there again.
    fading, _ = warmed(half_life_hours=1.0, decay_interval_s=0.0)
    for _ in range(12):
        fading.update("new", x, {"quality": 0.1}, now=12_000.0)
    assert new_share(fading, x) < 0.01
    later = 12_000.0 + 3 * 3600.0  # 3 half-lives: 1.5 of its 12 observations left
    for _ in range(12):  # the others are warm there again (their old data faded too)
        for arm in ("a", "b", "c"):
            fading.update(arm, x, {"quality": quality(arm, 3)}, now=later)
    assert 0.07 < new_share(fading, x) < 0.13


def edited_state(policy: Policy, edit: Callable[[dict], object]) -> Policy:
    """``policy`` saved, its JSON header changed by ``edit``, and restored."""
    data = policy.to_bytes()
    size = int.from_bytes(data[6:10], "big")
    header = json.loads(data[10:10 + size])
    edit(header)
    raw = json.dumps(header).encode()
    return Policy.from_bytes(data[:6] + len(raw).to_bytes(4, "big") + raw + data[10 + size:])


def test_cold_start_by_bad_value_names_the_field():
    with pytest.raises(InvalidInputError) as err:
        SelectiveThompson(4, cold_start_by="tag")
    assert err.value.field == "cold_start_by"
    assert "added-on-tags, arm, tags, new-on-tags, context" in str(err.value)


def from_the_start_stream(seed: int, **config: object) -> tuple[list, list]:
    """Every model there from the start, tagged requests, the policy learning from its
    own choices: (choices, propensities) of every decision."""
    rng = np.random.default_rng(seed)
    policy = SelectiveThompson(TEXT + TAGS, seed=seed, tag_dims=TAGS, **config)
    for arm in ("a", "b", "c", "new"):
        policy.add_arm(arm)
    choices, props = [], []
    for t in range(600):
        app = None if t % 5 == 0 else int(rng.integers(APPS))
        x = context(rng, app)
        d = policy.decide(x, PREFS)
        choices.append(d.arm)
        props.append(d.propensity)
        q = quality(d.arm, app if app is not None else 0)
        policy.update(d.arm, x, {"quality": float(np.clip(q + 0.1 * rng.standard_normal(),
                                                           0.0, 1.0))})
    assert policy.late_arms == []
    return choices, props


def test_policy_with_every_arm_from_the_start_decides_exactly_as_counted_in_total():
    for seed in range(2):
        added, arm = (from_the_start_stream(seed, cold_start_by=by)
                      for by in ("added-on-tags", "arm"))
        assert added[0] == arm[0]
        np.testing.assert_allclose(added[1], arm[1], rtol=0, atol=1e-10)
        # ... where counting per tag for every model ("tags") does change them.
        assert from_the_start_stream(seed, cold_start_by="tags")[0] != arm[0]
    assert SelectiveThompson(4).config.cold_start_by == "added-on-tags"


def test_added_late_flag_follows_the_arm():
    policy = SelectiveThompson(TEXT + TAGS, seed=0, tag_dims=TAGS)
    policy.add_arm("a")
    policy.add_arm("b")  # no quality observation yet: from the start
    assert policy.late_arms == []
    policy.update("a", context(np.random.default_rng(0), 1), {"quality": 0.5})
    policy.add_arm("c")
    policy.add_arm("d", late=False)  # said so (the learners' carriers)
    assert policy.late_arms == ["c"]
    # Serialized (with and without derived arrays) and cloned.
    for copy in (Policy.from_bytes(policy.to_bytes()),
                 Policy.from_bytes(policy.to_bytes(derived=False)), policy.clone()):
        assert copy.late_arms == ["c"]
    # Removed and re-added while the others have data: late again; "b" removed and
    # re-added is now late too (it joins a policy that has learned).
    policy.remove_arm("c")
    assert policy.late_arms == []
    policy.add_arm("c")
    policy.remove_arm("b")
    policy.add_arm("b")
    assert policy.late_arms == ["c", "b"]
    # Merge: late in either replica is late in the result (also an arm copied over).
    mine = SelectiveThompson(TEXT + TAGS, seed=1, tag_dims=TAGS)
    for arm in ("a", "b", "d"):
        mine.add_arm(arm)
    mine.merge(policy)
    assert sorted(mine.late_arms) == ["b", "c"]
    mine.set_late("b", False)
    assert mine.late_arms == ["c"]
    with pytest.raises(InvalidInputError):
        mine.set_late("zzz")


def test_removing_an_arm_does_not_shift_another_arms_tag_counts():
    def x(app: int) -> np.ndarray:
        return np.r_[np.zeros(TEXT), tag_block({"app": str(app)}, TAGS)]

    policy = SelectiveThompson(TEXT + TAGS, seed=0, tag_dims=TAGS, drift_delta=None)
    for arm in ("a", "b"):
        policy.add_arm(arm)
    for _ in range(20):
        policy.update("a", x(2), {"quality": 0.5})
        policy.update("b", x(2), {"quality": 0.5})
    policy.add_arm("late", late=True)
    policy.add_arm("c", late=False)
    for _ in range(20):
        policy.update("late", x(1), {"quality": 0.5})
        policy.update("c", x(2), {"quality": 0.5})
    xb = policy._features(x(2))

    def cold(p: Policy) -> object:
        mask = p._cold_by_direction(xb, p._arm_range(), p._cold_arms()[0])
        return None if mask is None else dict(zip(p.arms, mask[0].tolist(), strict=True))

    assert cold(policy) == {"a": False, "b": False, "late": True, "c": False}
    # Same number of arms after each swap: "late" moves to slot 0 and must keep its
    # own (empty) count on app 2, not "a"'s or "b"'s.
    for gone, new in (("a", "d"), ("b", "e")):
        policy.remove_arm(gone)
        policy.add_arm(new, late=False)
        for _ in range(20):
            policy.update(new, x(2), {"quality": 0.5})
    expected = {"late": True, "c": False, "d": False, "e": False}
    assert cold(Policy.from_bytes(policy.to_bytes())) == expected  # a fresh cache
    assert cold(policy) == expected


def test_late_arm_is_not_cold_on_a_tag_value_no_candidate_is_warm_on():
    def x(app: int) -> np.ndarray:
        return np.r_[np.zeros(TEXT), tag_block({"app": str(app)}, TAGS)]

    masks = {}
    for by in ("tags", "added-on-tags"):
        policy = SelectiveThompson(TEXT + TAGS, seed=0, tag_dims=TAGS, cold_start_by=by,
                                   drift_delta=None)
        policy.add_arm("a")
        policy.add_arm("b")
        for _ in range(30):
            policy.update("a", x(1), {"quality": 0.5})
            policy.update("b", x(1), {"quality": 0.5})
        policy.add_arm("new")
        for _ in range(10):  # warm in total and on app 1, never seen app 2 or 999
            policy.update("new", x(1), {"quality": 0.5})
        policy.update("a", x(2), {"quality": 0.5})
        for _ in range(10):
            policy.update("b", x(2), {"quality": 0.5})
        for app in (2, 999):
            xb = policy._features(x(app))
            mask = policy._cold_by_direction(xb, policy._arm_range(), policy._cold_arms()[0])
            masks[by, app] = None if mask is None else mask[0].tolist()
    # App 2: "b" is warm there, "new" (late) is cold, "a" (1 call) only with "tags".
    assert masks["tags", 2] == [True, False, True]
    assert masks["added-on-tags", 2] == [False, False, True]
    # App 999: nobody is warm there, so nobody's cold start is counted on it.
    assert masks["tags", 999] is None and masks["added-on-tags", 999] is None
