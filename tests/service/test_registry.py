"""The registry publishes its changes; the policy store applies them (one way)."""

from __future__ import annotations

import threading

import pytest

from service.db.engine import make_engine, upgrade
from service.domain import ModelState, TenantState
from service.exceptions import ConflictError, NotFoundError
from service.registry import Registry
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


@pytest.fixture
def registry(new_database_url):
    url = new_database_url()
    upgrade(url)
    engine = make_engine(url)
    reg = Registry(make_settings(url), engine, threading.RLock())
    reg.load()
    yield reg
    engine.dispose()


def test_registry_publishes_model_and_tenant_changes(registry):
    seen = Recorder()
    registry.subscribe(seen)
    registry.create_model("m1", 1.0, 2.0, True, 0.5)
    tenant, _key = registry.create_tenant("t")
    registry.update_preferences(tenant, {"scope": "isolated"})
    registry.delete_model("m1")
    assert seen.events == [("added", "m1"), ("tenant", "isolated"), ("removed", "m1")]
    assert registry.models == {}


def test_create_model_twice_conflict_names_field_and_changes_nothing(registry):
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


def test_rotate_key_old_key_stops_new_key_works(registry):
    tenant, old = registry.create_tenant("t")
    new = registry.rotate_key(tenant)
    assert registry.tenant_for_key(old) is None
    assert registry.tenant_for_key(new) is tenant


def test_refresh_publishes_models_added_by_another_replica(registry, new_database_url):
    other = Registry(registry.settings, registry.engine, threading.RLock())
    other.load()
    other.create_model("m2", 1.0, 1.0, True, None)
    seen = Recorder()
    registry.subscribe(seen)
    registry.refresh()
    assert ("added", "m2") in seen.events and "m2" in registry.models
