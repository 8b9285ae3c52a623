"""Restart recovery: checkpoints on shutdown, replay of feedback after a crash."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, delete, func, select
from sqlalchemy.orm import Session

from bandit import Policy, Preferences, SelectiveThompson
from service.app import create_app
from service.db import models as dbm
from tests.service.conftest import ADMIN, DIM, add_model, create_tenant, decide, make_settings

PROBES = np.random.default_rng(99).standard_normal((5, DIM))
PREFS = Preferences(1.0, 20.0, 0.1)


def train(client, tenant, models, rounds: int, offset: int = 0) -> None:
    rng = np.random.default_rng(offset)
    for i in range(rounds):
        d = decide(client, tenant, models, seed=offset + i).json()
        j = models.index(d["model"])
        r = client.post("/v1/feedback", json={
            "decision_id": d["decision_id"], "quality": float(rng.uniform(0.2 + 0.3 * j, 1.0)),
            "cost_usd": 0.001 * (j + 1), "latency_ms": float(rng.uniform(100, 900))},
            headers=tenant)
        assert r.status_code == 202 and r.json()["status"] == "applied"


def predictions(client, models) -> dict[str, np.ndarray]:
    out = {}
    service = client.app.state.routing
    for kind, policy in service.shared.items():
        rows = []
        for x in PROBES:
            preds = policy.predict(x, PREFS, models)
            rows.append([[p.quality, p.cost_usd, p.latency_ms, p.utility]
                         for p in preds.values()])
        out[kind] = np.array(rows)
    return out


def test_restart_after_shutdown_decides_identically(new_database_url):
    url = new_database_url()
    with TestClient(create_app(make_settings(url))) as c1:
        models = [add_model(c1, f"model-{i}", 0.5 * (i + 1), 2.0 * (i + 1)) for i in range(3)]
        tenant = create_tenant(c1)
        # LinUCB's argmax is deterministic: the tenant's next decisions are predictable.
        r = c1.put("/v1/tenants/me/preferences", json={"policy": "linucb"}, headers=tenant)
        assert r.status_code == 200, r.text
        train(c1, tenant, models, 30)
        before = predictions(c1, models)
        # What the shared LinUCB policy would decide next, from a copy of its state.
        twin = Policy.from_bytes(c1.app.state.routing.shared["linucb"].to_bytes())
    with TestClient(create_app(make_settings(url))) as c2:
        after = predictions(c2, models)
        for kind in before:
            np.testing.assert_allclose(after[kind], before[kind], rtol=0, atol=1e-12)
        prefs = Preferences()
        for seed in range(5):
            body = decide(c2, tenant, models, seed=seed).json()
            expected = twin.decide(np.asarray(decide_embedding(seed)), prefs, models)
            assert body["model"] == expected.arm
            assert body["propensity"] == pytest.approx(expected.propensity, abs=1e-12)


def decide_embedding(seed: int) -> list[float]:
    from tests.service.conftest import embedding

    return embedding(seed)


def test_restart_after_crash_replays_feedback(new_database_url):
    """A crash (no shutdown checkpoint) loses no acknowledged feedback: the new process
    loads the last checkpoint and replays the feedback rows written after it."""
    url = new_database_url()
    with TestClient(create_app(make_settings(url))) as c1:
        models = [add_model(c1, f"model-{i}", 0.5 * (i + 1), 2.0 * (i + 1)) for i in range(3)]
        tenant = create_tenant(c1)
        train(c1, tenant, models, 15)
        assert c1.app.state.routing.checkpoint(force=True)
        train(c1, tenant, models, 15, offset=100)
        live = predictions(c1, models)
        versions = {k: p.version for k, p in c1.app.state.routing.shared.items()}
        # c1 is still running and never checkpointed again: for the database this is
        # exactly a process killed with -9 after acknowledging the last feedback.
        with TestClient(create_app(make_settings(url))) as c2:
            recovered = predictions(c2, models)
            service = c2.app.state.routing
            assert service.last_feedback_id == c1.app.state.routing.last_feedback_id
            for kind in live:
                np.testing.assert_allclose(recovered[kind], live[kind], rtol=0, atol=1e-9)
                assert service.shared[kind].version == versions[kind]


def test_restart_keeps_model_registry_changes(new_database_url):
    url = new_database_url()
    with TestClient(create_app(make_settings(url))) as c1:
        keep, gone = add_model(c1, "keep"), add_model(c1, "gone")
        tenant = create_tenant(c1)
        # Each model decided alone: both learn, whichever one the policy prefers.
        train(c1, tenant, [keep], 2)
        train(c1, tenant, [gone], 2, offset=10)
        c1.app.state.routing.checkpoint(force=True)
        assert c1.delete("/v1/admin/models/gone", headers=ADMIN).status_code == 204
        late = add_model(c1, "late")
        # Crash-like restart (c1 never checkpoints again): the checkpoint still has
        # "gone" and lacks "late"; the registry wins.
        with TestClient(create_app(make_settings(url))) as c2:
            for policy in c2.app.state.routing.shared.values():
                assert sorted(policy.arms) == sorted([keep, late])
                assert policy.observations(keep)["quality"] == 2
            assert decide(c2, tenant).json()["model"] in (keep, late)


def test_refresh_registry_sees_other_replica_changes(new_database_url):
    """Two replicas on one database: models and tenants created on one reach the other."""
    url = new_database_url()
    with TestClient(create_app(make_settings(url))) as a, \
            TestClient(create_app(make_settings(url))) as b:
        first = add_model(a, "first")
        tenant = create_tenant(a)
        assert decide(b, tenant).status_code == 401
        b.app.state.routing.refresh_registry()
        assert decide(b, tenant).json()["model"] == first
        second = add_model(a, "second")
        assert a.delete("/v1/admin/models/first", headers=ADMIN).status_code == 204
        r = a.put("/v1/tenants/me/preferences", json={"policy": "thompson"}, headers=tenant)
        assert r.status_code == 200
        b.app.state.routing.refresh_registry()
        body = decide(b, tenant).json()
        assert body["model"] == second and body["policy"] == "thompson"
        for policy in b.app.state.routing.shared.values():
            assert policy.arms == [second]


def test_restart_after_crash_isolated_tenant_identical(new_database_url):
    """A tenant turned isolated after the last checkpoint: after a crash its policies are
    rebuilt from its history up to the checkpoint, then the replay adds the rest."""
    url = new_database_url()
    with TestClient(create_app(make_settings(url))) as c1:
        models = [add_model(c1, f"model-{i}", 0.5 * (i + 1), 2.0 * (i + 1)) for i in range(3)]
        tenant, other = create_tenant(c1), create_tenant(c1)
        train(c1, tenant, models, 8)
        train(c1, other, models, 8, offset=50)
        assert c1.app.state.routing.checkpoint(force=True)
        r = c1.put("/v1/tenants/me/preferences", json={"scope": "isolated"}, headers=tenant)
        assert r.status_code == 200
        train(c1, tenant, models, 8, offset=200)
        train(c1, other, models, 8, offset=300)
        live = c1.app.state.routing.isolated[tenant["X-Tenant"]]
        with TestClient(create_app(make_settings(url))) as c2:
            recovered = c2.app.state.routing.isolated[tenant["X-Tenant"]]
            for kind, policy in live.items():
                assert recovered[kind].observations(models[0]) == policy.observations(
                    models[0])
                for x in PROBES:
                    a = policy.predict(x, PREFS, models)
                    b = recovered[kind].predict(x, PREFS, models)
                    for name in models:
                        assert b[name].utility == pytest.approx(a[name].utility, abs=1e-9)


def test_restart_with_new_epsilon_keeps_statistics_uses_new_setting(new_database_url):
    url = new_database_url()
    with TestClient(create_app(make_settings(url, epsilon=0.01))) as c1:
        models = [add_model(c1, f"model-{i}", 0.5 * (i + 1), 2.0 * (i + 1)) for i in range(3)]
        train(c1, create_tenant(c1), models, 20)
        before = predictions(c1, models)
    with TestClient(create_app(make_settings(url, epsilon=0.2))) as c2:
        for kind, policy in c2.app.state.routing.shared.items():
            assert policy.config.epsilon == 0.2, kind
            assert type(policy) is type(c2.app.state.routing.policies.new_policy(kind)), kind
        after = predictions(c2, models)
        for kind in before:
            np.testing.assert_allclose(after[kind], before[kind], rtol=0, atol=1e-12)


def test_unset_epsilon_gives_each_kind_its_own_default_and_restart_keeps_it(new_database_url):
    """EPSILON unset: linucb keeps its 1% uniform share, thompson and select sample with
    none (the share measured against select's routing value); a restart restores the
    statistics with the same shares, not the checkpoint's."""
    url = new_database_url()
    expected = {"linucb": 0.01, "thompson": 0.0, "select": 0.0}
    for round_ in range(2):
        with TestClient(create_app(make_settings(url, epsilon=None))) as c:
            if round_ == 0:
                models = [add_model(c, f"model-{i}", 0.5 * (i + 1), 2.0 * (i + 1))
                          for i in range(3)]
                train(c, create_tenant(c), models, 10)
            shared = c.app.state.routing.shared
            assert {kind: p.config.epsilon for kind, p in shared.items()} == expected
            fresh = {kind: c.app.state.routing.policies.new_policy(kind).config.epsilon
                     for kind in shared}
            assert fresh == expected


def test_restart_upgrade_seeds_missing_kind_from_stored_sums(new_database_url):
    """A checkpoint written before the ``select`` kind existed (main with linucb as the
    default stored shared:linucb, shared:thompson and an isolated tenant's pair): after
    the upgrade, ``select`` (now the default) starts from their sums, its arms on their
    learned means, not from the priors."""
    url = new_database_url()
    with TestClient(create_app(make_settings(url))) as c1:
        models = [add_model(c1, f"model-{i}", 0.5 * (i + 1), 2.0 * (i + 1)) for i in range(3)]
        tenant = create_tenant(c1)
        r = c1.put("/v1/tenants/me/preferences", json={"scope": "isolated"}, headers=tenant)
        assert r.status_code == 200
        for i, name in enumerate(models):  # every arm learns, whatever a policy would pick
            for seed in range(5):
                d = decide(c1, tenant, [name], seed=seed).json()
                r = c1.post("/v1/feedback", json={"decision_id": d["decision_id"],
                                                  "quality": 0.2 + 0.3 * i}, headers=tenant)
                assert r.status_code == 202
        assert c1.app.state.routing.checkpoint(force=True)
        learned = {"shared": c1.app.state.routing.shared["linucb"],
                   "isolated": c1.app.state.routing.isolated[tenant["X-Tenant"]]["linucb"]}
    engine = create_engine(url)
    with Session(engine) as session, session.begin():
        newest = session.scalar(select(func.max(dbm.PolicyCheckpoint.id)))
        kinds = session.scalars(select(dbm.PolicySnapshot.key).where(
            dbm.PolicySnapshot.checkpoint_id == newest,
            dbm.PolicySnapshot.key.endswith(":select"))).all()
        assert sorted(kinds) == ["shared:select", f"tenant:{tenant['X-Tenant']}:select"]
        # Every checkpoint kept becomes one written before the kind existed.
        session.execute(delete(dbm.PolicySnapshot).where(
            dbm.PolicySnapshot.key.endswith(":select")))
    engine.dispose()
    with TestClient(create_app(make_settings(url))) as c2:
        service = c2.app.state.routing
        seeded = {"shared": service.shared["select"],
                  "isolated": service.isolated[tenant["X-Tenant"]]["select"]}
        for scope, policy in seeded.items():
            assert isinstance(policy, SelectiveThompson), scope
            for name in models:
                assert policy.observations(name) == learned[scope].observations(name)
                assert policy.observations(name)["quality"] == 5, scope
            # On its means alone (no prequential errors yet): at every context, each
            # arm's 5 outcomes of 0.2 + 0.3 i with the declared prior 0.5 worth 1.
            for x in PROBES:
                got = [policy.predict(x, PREFS, models)[n].quality for n in models]
                np.testing.assert_allclose(got, [(0.5 + 5 * (0.2 + 0.3 * i)) / 6
                                                 for i in range(3)], rtol=0, atol=1e-6)
