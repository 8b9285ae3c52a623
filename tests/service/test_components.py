"""The routing core's components alone: the registry publishes its changes (and knows
nothing of who listens), the policy store applies them, feedback ingest stores once and
hands applied outcomes to the policy store; a mode is a set of plugged components."""

from __future__ import annotations

import threading
from datetime import timedelta

import numpy as np
import pytest

from service import decider as decider_module
from service.db import models as m
from service.db.engine import make_engine, upgrade
from service.domain import POLICY_KINDS, ModelState, TenantState
from service.exceptions import ConflictError, NotFoundError
from service.ingest import FeedbackIngest, Incoming
from service.metrics import Metrics
from service.registry import Registry
from service.routing import RoutingService
from service.security import hash_key
from tests.service.conftest import make_settings


class Recorder:
    """A listener that writes down what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def model_added(self, model: ModelState) -> None:
        self.events.append(("added", model.name))

    def model_removed(self, name: str) -> None:
        self.events.append(("removed", name))

    def tenant_changed(self, tenant: TenantState) -> None:
        self.events.append(("tenant", tenant.scope))

    def baseline_changed(self, tenant: TenantState) -> None:
        self.events.append(("baseline", str(tenant.baseline_model)))


@pytest.fixture
def database(new_database_url):
    url = new_database_url()
    upgrade(url)
    engine = make_engine(url)
    yield url, engine
    engine.dispose()


@pytest.fixture
def registry(database):
    url, engine = database
    reg = Registry(make_settings(url), engine, threading.RLock())
    reg.load()
    return reg


def test_registry_publishes_model_and_tenant_changes(registry):
    seen = Recorder()
    registry.subscribe(seen)
    registry.create_model("m1", 1.0, 2.0, True, 0.5)
    tenant, _key = registry.create_tenant("t")
    registry.update_preferences(tenant, {"scope": "isolated"})
    registry.delete_model("m1")
    assert seen.events == [("added", "m1"), ("tenant", "isolated"), ("removed", "m1")]
    assert registry.models == {}


def test_create_model_twice_conflict_names_field_and_publishes_nothing(registry):
    seen = Recorder()
    registry.subscribe(seen)
    registry.create_model("m1", 1.0, 2.0, True, None)
    with pytest.raises(ConflictError) as err:
        registry.create_model("m1", 3.0, 4.0, True, None)
    assert (err.value.field, err.value.reason) == ("name", "already used")
    assert registry.models["m1"].input_price_per_mtok == 1.0
    assert seen.events == [("added", "m1")]
    with pytest.raises(NotFoundError, match="'nope' does not exist"):
        registry.get_model("nope")


def test_rekey_tenant_old_key_stops_new_key_works(registry):
    tenant, old = registry.create_tenant("t")
    registry.rekey(tenant, hash_key("brt_new"))
    assert registry.tenant_for_key(old) is None
    assert registry.tenant_for_key("brt_new") is tenant


def test_refresh_publishes_changes_made_by_another_replica(registry):
    other = Registry(registry.settings, registry.engine, threading.RLock())
    other.load()
    tenant, _ = registry.create_tenant("t")
    other.refresh()
    other.create_model("m2", 1.0, 1.0, True, None)
    other.update_preferences(other.tenants[tenant.id], {"baseline_model": "m2"})
    seen = Recorder()
    registry.subscribe(seen)
    registry.refresh()
    assert ("added", "m2") in seen.events and "m2" in registry.models
    assert ("baseline", "m2") in seen.events and tenant.baseline_model == "m2"


def test_refresh_bumps_models_version_only_when_models_changed(registry):
    """The decider's price caches key on ``models_version``: a refresh that finds the
    models as they were (every few seconds) keeps it; a change through another replica
    (a price, a new model, a deletion) bumps it."""
    registry.create_model("m1", 1.0, 1.0, True, None)
    other = Registry(registry.settings, registry.engine, threading.RLock())
    other.load()
    registry.refresh()
    version = registry.models_version
    registry.refresh()
    registry.refresh()
    assert registry.models_version == version
    other.update_model("m1", {"input_price_per_mtok": 2.0})
    registry.refresh()
    assert registry.models_version > version
    assert registry.models["m1"].input_price_per_mtok == 2.0
    for change in (lambda: other.create_model("m2", 1.0, 1.0, True, None),
                   lambda: other.delete_model("m2")):
        version = registry.models_version
        change()
        registry.refresh()
        assert registry.models_version > version


def test_refresh_that_read_before_a_local_change_keeps_it(registry, monkeypatch):
    """A refresh reads the rows, then a model is created, another deleted and a
    preference changed here before it takes the lock: its older rows undo none of it."""
    registry.create_model("old", 1.0, 1.0, True, None)
    tenant, _ = registry.create_tenant("t")
    read, go = threading.Event(), threading.Event()
    real = registry.reload_admin_keys

    def between_read_and_lock() -> None:
        read.set()
        go.wait(30)
        real()

    monkeypatch.setattr(registry, "reload_admin_keys", between_read_and_lock)
    seen = Recorder()
    registry.subscribe(seen)
    worker = threading.Thread(target=registry.refresh)
    worker.start()
    assert read.wait(30)
    registry.create_model("new", 1.0, 1.0, True, None)
    registry.delete_model("old")
    registry.update_preferences(tenant, {"weights": {"quality": 1.0, "cost": 5.0,
                                                     "latency": 0.0}})
    go.set()
    worker.join(30)
    assert set(registry.models) == {"new"}
    assert tenant.preferences.cost == 5.0
    assert ("removed", "new") not in seen.events and ("added", "old") not in seen.events
    registry.refresh()  # rows newer than the changes: the same state
    assert set(registry.models) == {"new"} and tenant.preferences.cost == 5.0


@pytest.fixture
def service(database, tmp_path):
    url, engine = database
    routing = RoutingService(make_settings(url, data_dir=tmp_path), engine, Metrics())
    routing.start()
    yield routing
    routing.stop()


def test_decider_prices_follow_another_replicas_price_change(service, database):
    _, engine = database
    routing = service
    routing.registry.create_model("p1", 1.0, 2.0, True, None)
    decider, s = routing.decider, routing.settings
    before = decider.price_estimates(["p1"], [None]).array
    assert before[0, 0] == (s.prior_input_tokens * 1.0 + s.prior_output_tokens * 2.0) / 1e6
    other = Registry(routing.registry.settings, engine, threading.RLock())
    other.load()
    other.update_model("p1", {"input_price_per_mtok": 5.0})
    routing.registry.refresh()
    after = decider.price_estimates(["p1"], [None, 10]).array
    out = s.prior_output_tokens * 2.0
    assert after[:, 0].tolist() == [(s.prior_input_tokens * 5.0 + out) / 1e6,
                                    (10 * 5.0 + out) / 1e6]


def test_decider_estimate_of_the_same_prompts_follows_a_price_change(service, database):
    """The estimate for the same candidates and token counts is kept (service.decider):
    a change of the models' prices (here, or another replica's seen by a refresh) is
    priced at once."""
    _, engine = database
    routing = service
    routing.registry.create_model("p1", 1.0, 2.0, True, None)
    decider, s = routing.decider, routing.settings
    out = s.prior_output_tokens * 2.0
    first = decider.price_estimates(["p1"], [None, 10])
    assert first.array[:, 0].tolist() == [(s.prior_input_tokens * 1.0 + out) / 1e6,
                                          (10 * 1.0 + out) / 1e6]
    assert decider.price_estimates(["p1"], [None, 10]) is first  # kept
    routing.registry.update_model("p1", {"input_price_per_mtok": 5.0})
    assert decider.price_estimates(["p1"], [None, 10]).array[:, 0].tolist() == [
        (s.prior_input_tokens * 5.0 + out) / 1e6, (10 * 5.0 + out) / 1e6]
    other = Registry(routing.registry.settings, engine, threading.RLock())
    other.load()
    other.update_model("p1", {"input_price_per_mtok": 7.0})
    routing.registry.refresh()
    assert decider.price_estimates(["p1"], [None, 10]).array[:, 0].tolist() == [
        (s.prior_input_tokens * 7.0 + out) / 1e6, (10 * 7.0 + out) / 1e6]
    # The same tokens on other candidates: their own estimate.
    routing.registry.create_model("p2", 3.0, 0.0, True, None)
    both = decider.price_estimates(["p2", "p1"], [10])
    assert both.names == ["p2", "p1"]
    assert both.array.tolist() == [[30.0 / 1e6, (70.0 + out) / 1e6]]


def test_decider_estimates_kept_are_bounded(service, monkeypatch):
    routing = service
    routing.registry.create_model("p1", 1.0, 2.0, True, None)
    routing.registry.create_model("p2", 1.0, 2.0, True, None)
    monkeypatch.setattr(decider_module, "_ESTIMATES", 5)
    decider = routing.decider
    for tokens in range(12):
        estimate = decider.price_estimates(["p1", "p2"], [tokens])
        out = 2.0 * routing.settings.prior_output_tokens
        assert estimate.array.tolist() == [[(tokens + out) / 1e6] * 2]
        assert len(decider._estimates) <= 5
    assert len(decider._estimates) == 2  # 12 = 5 + 5 + 2


def test_embedded_mode_plugs_ingest_and_checkpoints(service):
    assert type(service.sink).__name__ == "FeedbackIngest"
    assert type(service.statistics).__name__ == "Checkpoints"
    assert service.local is not None and service.decider.on_queued is None


def test_policy_store_follows_the_registry(service):
    service.create_model("a", 1.0, 1.0, True, 0.5)
    assert all("a" in p.arms for p in service.policies.all_policies().values())
    tenant, _ = service.create_tenant("iso")
    service.update_preferences(tenant, {"scope": "isolated"})
    assert set(service.policies.isolated[tenant.id]) == {"linucb", "thompson", "select"}
    assert set(POLICY_KINDS) == {"linucb", "thompson", "select"}
    service.delete_model("a")
    assert all("a" not in p.arms for p in service.policies.all_policies().values())
    service.update_preferences(tenant, {"scope": "shared"})
    assert tenant.id not in service.policies.isolated


def test_store_many_applies_once_reports_each_item(service):
    service.create_model("a", 1.0, 1.0, True, 0.5)
    tenant, _ = service.create_tenant("t")
    other, _ = service.create_tenant("other")
    x = np.full(service.context_dim, 0.1)
    pending = service.decide(tenant, x, None, None)
    assert service.enqueue(pending)
    service.writer.flush(timeout=5.0)
    decision_id = pending.row["id"]
    ingest = service.sink
    assert isinstance(ingest, FeedbackIngest)
    now = m.utcnow()
    items = [Incoming(tenant, decision_id, "e1", {"quality": 1.0}, now),
             Incoming(tenant, decision_id, "e1", {"quality": 0.0}, now),  # repeat in batch
             Incoming(other, decision_id, "e2", {"quality": 1.0}, now),  # not its decision
             Incoming(tenant, "0" * 36, "e3", {"quality": 1.0}, now)]
    version = service.shared["linucb"].version
    results = ingest.store_many(items)
    assert [r.status for r in results] == ["applied", "duplicate", "unknown-decision",
                                           "unknown-decision"]
    assert results[0].feedback_id == service.last_feedback_id
    assert service.shared["linucb"].version == version + 1
    again = ingest.store_many([items[0]._replace(received=now + timedelta(seconds=1))])
    assert (again[0].status, again[0].feedback_id) == ("duplicate", results[0].feedback_id)
    assert service.shared["linucb"].version == version + 1


def test_prediction_dicts_equal_the_library_predictions_plus_price():
    from bandit import ArmPrior, LinUCB, Preferences
    from service.decider import prediction_dicts

    policy = LinUCB(8, seed=3)
    for name in ("a", "b", "c"):
        policy.add_arm(name, ArmPrior(quality=None if name == "c" else 0.5, cost_usd=0.01))
    xs = np.random.default_rng(1).normal(size=(4, 8))
    prices = np.arange(12, dtype=np.float64).reshape(4, 3) / 100
    decided = policy.decide_batch(xs, Preferences(1.0, 2.0, 0.1), ["a", "b", "c"],
                                  cost_estimate=prices)
    rows = prediction_dicts(decided, prices)
    assert len(rows) == 4
    for r, row in enumerate(rows):
        expected = {name: {**p.as_dict(), "price_usd": prices[r][j]}
                    for j, (name, p) in enumerate(decided.decision(r).predictions.items())}
        assert row == expected
