"""Guarded exploration in the service: tenant settings (422 naming the setting), the next
decision guarded, the value against the baseline on /metrics and the status page, the
guard's state rebuilt after a restart, nothing learned lost when settings change."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import (
    ADMIN,
    add_model,
    assert_problem,
    create_tenant,
    decide,
    make_settings,
)


def _prefs(client: TestClient, tenant: dict[str, str]) -> dict:
    r = client.get("/v1/tenants/me/preferences", headers=tenant)
    assert r.status_code == 200, r.text
    return r.json()


def _guard_values(text: str, tenant_id: str) -> dict[str, float]:
    out = {}
    for name, labels in (("bandit_router_value_vs_baseline", f'tenant="{tenant_id}"'),
                         ("bandit_router_guard_gap", f'kind="allowed",tenant="{tenant_id}"'),
                         ("bandit_router_guard_gap",
                          f'kind="lower_bound",tenant="{tenant_id}"')):
        match = re.search(re.escape(name + "{" + labels + "}") + r" (\S+)", text)
        assert match, f"{name}{{{labels}}} not in /metrics"
        out[name + labels] = float(match.group(1))
    return out


@pytest.fixture(scope="module")
def models(client: TestClient) -> list[str]:
    return [add_model(client, "guard-a", 1.0, 2.0), add_model(client, "guard-b", 0.1, 0.2),
            add_model(client, "guard-c", 0.5, 0.5)]


@pytest.mark.parametrize(("body", "field", "allowed"), [
    ({"baseline_model": "no-such-model"}, "baseline_model", "guard-a"),
    ({"max_exploration_loss": 1.5}, "max_exploration_loss", "<= 1.0"),
    ({"max_exploration_loss": -0.01}, "max_exploration_loss", ">= 0.0"),
    ({"max_exploration_loss": None}, "max_exploration_loss", None),
    ({"baseline_model": ""}, "baseline_model", None),
])
def test_put_preferences_bad_guard_settings_422_names_setting_and_changes_nothing(
        client, models, body, field, allowed):
    tenant = create_tenant(client, f"guard-bad-{field}")
    before = _prefs(client, tenant)
    assert before["baseline_model"] is None and before["max_exploration_loss"] == 0.02
    r = client.put("/v1/tenants/me/preferences", json={**body, "weights": {
        "quality": 1.0, "cost": 5.0, "latency": 0.0}}, headers=tenant)
    problem = assert_problem(r, 422, field)
    if allowed is not None:
        error = next(e for e in problem["errors"] if e["field"] == field)
        assert allowed in (error["allowed"] or "") + error["message"], error
    assert _prefs(client, tenant) == before


def test_guard_applies_to_next_decision_and_plays_baseline_until_it_earns_room(
        client, models):
    tenant = create_tenant(client, "guard-next")
    # Without a guard a fresh policy explores: not every decision is guard-a.
    free = [decide(client, tenant, seed=i).json()["model"] for i in range(40)]
    assert set(free) - {"guard-a"}, free
    r = client.put("/v1/tenants/me/preferences",
                   json={"baseline_model": "guard-a", "max_exploration_loss": 0.05},
                   headers=tenant)
    assert r.status_code == 200, r.text
    assert r.json()["baseline_model"] == "guard-a"
    assert r.json()["max_exploration_loss"] == 0.05
    guarded = [decide(client, tenant, seed=i).json() for i in range(40)]
    # Nothing earned yet: every decision plays the baseline; an override is logged with
    # its propensity under policy + guard, never as exploration.
    assert {d["model"] for d in guarded} == {"guard-a"}
    assert not any(d["explored"] for d in guarded)
    assert all(0 < d["propensity"] <= 1 for d in guarded)
    # A request that leaves the baseline out is not guarded (the guard cannot play it).
    r = decide(client, tenant, candidates=["guard-b", "guard-c"])
    assert r.status_code == 200 and r.json()["model"] in ("guard-b", "guard-c")
    state = client.app.state.routing.tenants[tenant["X-Tenant"]].guard_state
    assert state.rounds == 40 and state.plays == 0


def test_guard_value_on_metrics_and_status_page(client, models):
    tenant = create_tenant(client, "guard-metrics")
    tid = tenant["X-Tenant"]
    client.put("/v1/tenants/me/preferences", json={"baseline_model": "guard-a"},
               headers=tenant)
    expected = 0.0
    for i in range(5):
        d = decide(client, tenant, seed=i).json()
        assert d["model"] == "guard-a"
        r = client.post("/v1/feedback", json={"decision_id": d["decision_id"],
                                              "quality": 0.9}, headers=tenant)
        assert r.status_code == 202, r.text
        # Doubly robust: r - (u_b + (r - u_b) / p) where the baseline was played.
        u_b, p = d["predictions"]["guard-a"]["utility"], d["propensity"]
        expected += 0.9 - (u_b + (0.9 - u_b) / p)
    values = _guard_values(client.get("/metrics", headers=ADMIN).text, tid)
    assert values[f'bandit_router_value_vs_baselinetenant="{tid}"'] == pytest.approx(
        expected, abs=1e-9)
    # Realized baseline reward 0.9 x 5 decisions, 2% of it.
    assert values[f'bandit_router_guard_gapkind="allowed",tenant="{tid}"'] == pytest.approx(
        -0.02 * 0.9 * 5, rel=1e-6)
    assert values[f'bandit_router_guard_gapkind="lower_bound",tenant="{tid}"'] <= 0.0
    page = client.get("/", headers=ADMIN).text
    row = re.search(rf"<tr data-guard='{tid}'>(.*?)</tr>", page)
    assert row, "guarded tenant missing from the status page"
    assert "guard-metrics" in row.group(1) and "guard-a" in row.group(1)
    assert "2.0%" in row.group(1) and f"{expected:+.3f}" in row.group(1)


def test_guard_changing_settings_keeps_learned_statistics(client, models):
    tenant = create_tenant(client, "guard-keep")
    d = decide(client, tenant, seed=3).json()
    client.post("/v1/feedback", json={"decision_id": d["decision_id"], "quality": 0.7},
                headers=tenant)
    before = decide(client, tenant, seed=11).json()["predictions"]
    for body in ({"baseline_model": "guard-b"}, {"max_exploration_loss": 0.1},
                 {"baseline_model": None}):
        r = client.put("/v1/tenants/me/preferences", json=body, headers=tenant)
        assert r.status_code == 200, r.text
    after = decide(client, tenant, seed=11).json()["predictions"]
    assert {k: v["utility"] for k, v in after.items()} == pytest.approx(
        {k: v["utility"] for k, v in before.items()})
    assert _prefs(client, tenant)["baseline_model"] is None
    assert _prefs(client, tenant)["max_exploration_loss"] == 0.1


def test_guard_state_rebuilt_after_restart(new_database_url):
    url = new_database_url()
    with TestClient(create_app(make_settings(url))) as client:
        for name in ("r-a", "r-b"):
            add_model(client, name)
        tenant = create_tenant(client, "guard-restart")
        r = client.put("/v1/admin/tenants/" + tenant["X-Tenant"] + "/preferences",
                       json={"baseline_model": "r-a", "max_exploration_loss": 0.03},
                       headers=ADMIN)
        assert r.status_code == 200, r.text
        for i in range(12):
            d = decide(client, tenant, seed=i).json()
            if i % 2 == 0:  # feedback in two events for some: merged, counted once
                for event, outcome in (("q", {"quality": 0.6}), ("c", {"cost_usd": 0.001})):
                    r = client.post("/v1/feedback", json={"decision_id": d["decision_id"],
                                                          "event_id": event, **outcome},
                                    headers=tenant)
                    assert r.status_code == 202, r.text
        live = client.app.state.routing.tenants[tenant["X-Tenant"]].guard_state.to_dict()
    assert live["rounds"] == 12 and live["value_rounds"] == 6
    with TestClient(create_app(make_settings(url))) as client:
        restored = client.app.state.routing.tenants[tenant["X-Tenant"]]
        assert restored.baseline_model == "r-a" and restored.max_exploration_loss == 0.03
        assert restored.guard_state.to_dict() == pytest.approx(live)
