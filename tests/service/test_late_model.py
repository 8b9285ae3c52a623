"""A model registered on a service whose policies have started learning is marked
added late in every policy (``cold_start_by="added-on-tags"``, the default), through
the same ``add_arm`` as the library; models there before any feedback are not."""

from __future__ import annotations

import threading
import typing
from types import SimpleNamespace

import pydantic
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from bandit import ArmPrior
from service.app import create_app
from service.db.engine import make_engine
from service.distributed import FollowedStatistics
from service.domain import POLICY_CLASSES, POLICY_KINDS, ModelState
from streams.stats import new_statistics
from tests.service.conftest import add_model, create_tenant, make_settings


def late_arms_by_key(client: TestClient) -> dict[str, tuple[str, ...]]:
    return {key: tuple(p.late_arms)
            for key, p in client.app.state.routing.policies.all_policies().items()}


def late_arms(client: TestClient) -> set[tuple[str, ...]]:
    return set(late_arms_by_key(client).values())


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
        # A tenant turning isolated: its policies are rebuilt from the registry and its
        # feedback (every model added before any data), and still know.
        r = c.put("/v1/tenants/me/preferences", json={"scope": "isolated"}, headers=tenant)
        assert r.status_code == 200, r.text
        assert late_arms(c) == {("late-c",)} and len(late_arms_by_key(c)) == 2 * len(POLICY_KINDS)
    # A restart (the checkpoint, then the feedback after it) keeps it.
    with TestClient(create_app(settings)) as c:
        assert late_arms(c) == {("late-c",)}
    # So does one without any checkpoint (replayed from the feedback onto new policies).
    engine = make_engine(settings.database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM policy_snapshots"))
            conn.execute(text("DELETE FROM policy_checkpoints"))
    finally:
        engine.dispose()
    with TestClient(create_app(settings)) as c:
        assert late_arms(c) == {("late-c",)} and len(late_arms_by_key(c)) == 2 * len(POLICY_KINDS)


def test_late_means_learned_not_decided(new_database_url):
    """A model is late when the policies have a quality observation, as the library's
    ``add_arm`` decides. Before, any decision row made it late: one decide without
    feedback made every later model late (and one registered while the first
    decisions waited for the writer was not)."""
    with TestClient(create_app(make_settings(new_database_url(), dim=64))) as c:
        add_model(c, "first")
        tenant = create_tenant(c)
        d = c.post("/v1/decide", json={"query": {"text": "a question"}},
                   headers=tenant).json()
        assert c.app.state.routing.writer.flush(timeout=5.0)
        add_model(c, "decided-only")  # a decision, no feedback: not late
        assert late_arms(c) == {()}
        r = c.post("/v1/feedback", json={"decision_id": d["decision_id"], "quality": 0.9},
                   headers=tenant)
        assert r.status_code < 300, r.text
        add_model(c, "learned")
        assert late_arms(c) == {("learned",)}
        registry = c.app.state.routing.registry
        assert {n: s.added_late for n, s in registry.models.items()} == {
            "first": False, "decided-only": False, "learned": True}


def test_distributed_snapshot_has_the_registrys_late_models():
    # The decider's snapshot is the registry's models plus the learners' sums, which
    # never mark an arm late (an arm joins them at its first feedback): whether a model
    # was added late is the registry's (models.added_late), so a restarted replica or
    # a snapshot built while a model is registered has it too.
    from service.policies import PolicyStore

    models = {name: ModelState(name, 1.0, 1.0, True, None, 0.001, added_late=name == "c")
              for name in ("a", "b", "c")}
    registry = SimpleNamespace(lock=threading.RLock(), models=models, tenants={},
                               subscribe=lambda store: None,
                               prior=lambda model: ArmPrior(cost_usd=model.prior_cost_usd))
    contexts = SimpleNamespace(dim=4, tag_dims=0, tag_settings=dict)
    store = PolicyStore(make_settings("sqlite://"), registry, SimpleNamespace(), contexts)
    total = new_statistics(4)
    total.add_arm("a", late=False)
    total.update("a", [1.0, 0.0, 0.0, 0.0], {"quality": 0.5})
    total.add_arm("c", late=False)  # first feedback in a later batch: not "late"
    total.update("c", [1.0, 0.0, 0.0, 0.0], {"quality": 0.5})
    followed = SimpleNamespace(policies=store)
    assert not store.learning()
    snaps = {}
    for kind in POLICY_KINDS:
        snap = snaps[kind] = FollowedStatistics.snapshot(followed, kind, total)
        assert snap.late_arms == ["c"] and snap.observations("c")["quality"] == 1
    store.install(snaps, {})
    assert store.learning()  # a model registered now is late (the learners' sums)


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


def test_cold_start_by_setting_applies_to_new_and_restored_policies():
    # BANDIT_ROUTER_COLD_START_BY: a deployment chooses "arm" back (before, only the
    # class default: new policies, checkpoints and snapshots all took "added-on-tags").
    from service.policies import PolicyStore

    registry = SimpleNamespace(lock=threading.RLock(), models={}, tenants={},
                               subscribe=lambda store: None)
    contexts = SimpleNamespace(dim=4, tag_dims=0, tag_settings=dict)
    store = PolicyStore(make_settings("sqlite://", cold_start_by="arm"), registry,
                        SimpleNamespace(), contexts)
    assert {store.new_policy(kind).config.cold_start_by for kind in POLICY_KINDS} == {"arm"}
    saved = {f"shared:{kind}": POLICY_CLASSES[kind](4).to_bytes() for kind in POLICY_KINDS}
    store.restore(saved, rebuild=False)
    assert {p.config.cold_start_by for p in store.shared.values()} == {"arm"}


def test_cold_start_by_setting_refuses_an_unknown_value_naming_the_choices():
    from bandit.base import COLD_START_BY
    from service.config import Settings

    with pytest.raises(pydantic.ValidationError) as err:
        make_settings("sqlite://", cold_start_by="per-tag")
    assert "cold_start_by" in str(err.value) and "'added-on-tags'" in str(err.value)
    # The setting's choices are the library's.
    choices = typing.get_args(Settings.model_fields["cold_start_by"].annotation)[0]
    assert typing.get_args(choices) == COLD_START_BY


def test_model_registered_while_a_stored_quality_is_not_learned_yet_is_late(
        new_database_url):
    """A quality is stored (another replica's, a learner's not in this replica's snapshot
    yet, or this one's between its commit and its apply) but no policy here has learned
    it: a model registered now is late too (the stored quality read before its insert).
    Before, only ``learning()`` was asked, just before the insert: not late."""
    with TestClient(create_app(make_settings(new_database_url(), dim=64))) as c:
        add_model(c, "first")
        routing = c.app.state.routing
        engine = routing.engine
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO feedback (decision_id, tenant_id, event_id, quality,"
                " created_at) VALUES ('elsewhere', 't', '', 0.9, :t)"),
                {"t": "2026-12-04 00:00:00+00:00"})
        assert not routing.policies.learning()
        add_model(c, "meanwhile")
        assert routing.registry.models["meanwhile"].added_late
        assert late_arms(c) == {("meanwhile",)}
