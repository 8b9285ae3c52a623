"""A model registered on a service whose policies have started learning is marked
added late in every policy (``cold_start_by="added-on-tags"``, the default), through
the same ``add_arm`` as the library; models there before any feedback are not."""

from __future__ import annotations

import threading
from types import SimpleNamespace

from fastapi.testclient import TestClient

from bandit import Policy
from service.app import create_app
from service.distributed import FollowedStatistics
from service.domain import POLICY_CLASSES, POLICY_KINDS
from streams.stats import new_statistics
from tests.service.conftest import add_model, create_tenant, make_settings


def late_arms(client: TestClient) -> set[tuple[str, ...]]:
    return {tuple(p.late_arms) for p in client.app.state.routing.policies.all_policies()
            .values()}


def test_model_registered_while_learning_is_late_and_stays_so(new_database_url):
    settings = make_settings(new_database_url(), dim=64)
    with TestClient(create_app(settings)) as c:
        add_model(c, "late-a")
        add_model(c, "late-b")
        tenant = create_tenant(c)
        assert late_arms(c) == {()}
        d = c.post("/v1/decide", json={"query": {"text": "a question"}},
                   headers=tenant).json()
        r = c.post("/v1/feedback", json={"decision_id": d["decision_id"], "quality": 0.9},
                   headers=tenant)
        assert r.status_code < 300, r.text
        c.app.state.routing.writer.flush(timeout=5.0)
        add_model(c, "late-c")
        assert late_arms(c) == {("late-c",)}
    # A restart (the checkpoint, then the feedback after it) keeps it.
    with TestClient(create_app(settings)) as c:
        assert late_arms(c) == {("late-c",)}


def test_distributed_snapshot_keeps_the_installed_policys_late_models():
    # The decider's snapshot is the registry's priors (no arm late) plus the learners'
    # sums, which never mark an arm late (an arm joins them at its first feedback):
    # the late models come from the policy it replaces (model_added marked them).
    store = SimpleNamespace(lock=threading.Lock(), sync_arms=lambda policy: None)

    def new_policy(kind: str) -> Policy:
        policy = POLICY_CLASSES[kind](4)
        for arm in ("a", "b", "c"):
            policy.add_arm(arm)
        return policy

    store.new_policy = new_policy
    total = new_statistics(4)
    total.add_arm("a", late=False)
    total.update("a", [1.0, 0.0, 0.0, 0.0], {"quality": 0.5})
    total.add_arm("c", late=False)  # first feedback in a later batch: not "late"
    total.update("c", [1.0, 0.0, 0.0, 0.0], {"quality": 0.5})
    followed = SimpleNamespace(policies=store)
    for kind in POLICY_KINDS:
        assert FollowedStatistics.snapshot(followed, kind, total).late_arms == []
        snap = FollowedStatistics.snapshot(followed, kind, total, ["c", "gone"])
        assert snap.late_arms == ["c"] and snap.observations("c")["quality"] == 1


def test_checkpoint_written_before_the_default_restores_with_it():
    # main's checkpoints store cold_start_by="arm" explicitly: the restart takes this
    # process's default, as it does for epsilon and forgetting.
    from service.policies import PolicyStore

    registry = SimpleNamespace(lock=threading.RLock(), models={"a": SimpleNamespace(name="a")},
                               tenants={},
                               subscribe=lambda store: None)
    contexts = SimpleNamespace(dim=4, tag_dims=0, tag_settings=dict)
    store = PolicyStore(make_settings("sqlite://"), registry, SimpleNamespace(), contexts)
    old = {}
    for kind in POLICY_KINDS:
        policy = POLICY_CLASSES[kind](4, cold_start_by="arm")
        policy.add_arm("a")
        policy.update("a", [1.0, 0.0, 0.0, 0.0], {"quality": 0.5})
        old[f"shared:{kind}"] = policy.to_bytes()
    store.restore(old, rebuild=False)
    assert {p.config.cold_start_by for p in store.shared.values()} == {"added-on-tags"}
    assert {p.observations("a")["quality"] for p in store.shared.values()} == {1}
