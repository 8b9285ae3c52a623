"""Reservations of decides whose feedback never reported a cost: listed and released by
an operator (GET /v1/admin/reservations, POST /v1/admin/reservations/release), on
SQLite and PostgreSQL."""

from __future__ import annotations

import time

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

# Everything decided more than this long ago is "old" for the tests (3.6 s).
AGE_H = 0.001


@pytest.fixture(scope="module")
def client(new_database_url):
    with TestClient(create_app(make_settings(new_database_url()))) as c:
        yield c


def _usage(client: TestClient, tenant: dict[str, str]) -> float:
    return client.get("/v1/tenants/me/usage", headers=tenant).json()["spend_usd_today"]


def test_list_and_release_old_reservations(client):
    model = add_model(client, "res-m", 1.0, 2.0)
    tenant = create_tenant(client, "res-co")
    client.put("/v1/tenants/me/preferences", json={"budget_usd_per_day": 10.0},
               headers=tenant)
    ids = [decide(client, tenant, [model], seed=i).json()["decision_id"] for i in range(3)]
    client.post("/v1/feedback", json={"decision_id": ids[0], "cost_usd": 0.01},
                headers=tenant)
    # Quality only: the decision stays charged at its predicted cost.
    client.post("/v1/feedback", json={"decision_id": ids[1], "quality": 0.5}, headers=tenant)
    client.app.state.routing.writer.flush()
    predicted = client.app.state.routing.models[model].prior_cost_usd
    assert _usage(client, tenant) == pytest.approx(0.01 + 2 * predicted)

    default = client.get("/v1/admin/reservations", headers=ADMIN).json()
    assert default["older_than_hours"] == 24.0 and default["decisions"] == 0

    time.sleep(AGE_H * 3600 + 0.5)
    listed = client.get("/v1/admin/reservations",
                        params={"older_than_hours": AGE_H, "tenant": "res-co"},
                        headers=ADMIN).json()
    assert [(t["name"], t["decisions"]) for t in listed["tenants"]] == [("res-co", 2)]
    assert listed["reserved_usd"] == pytest.approx(2 * predicted)

    r = client.post("/v1/admin/reservations/release",
                    json={"older_than_hours": AGE_H, "tenant": tenant["X-Tenant"]},
                    headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["decisions"] == 2
    assert r.json()["released_usd"] == pytest.approx(2 * predicted)
    assert _usage(client, tenant) == pytest.approx(0.01)
    again = client.get("/v1/admin/reservations", params={"older_than_hours": AGE_H},
                       headers=ADMIN).json()
    assert all(t["tenant_id"] != tenant["X-Tenant"] for t in again["tenants"])
    # The ledger survives a spend sync (what every replica runs periodically).
    client.app.state.routing.sync_spend()
    assert _usage(client, tenant) == pytest.approx(0.01)
    # A cost reported after the release is still charged, in full.
    client.post("/v1/feedback", json={"decision_id": ids[2], "cost_usd": 0.02},
                headers=tenant)
    assert _usage(client, tenant) == pytest.approx(0.03)


def test_reservations_bad_input(client):
    assert_problem(client.get("/v1/admin/reservations", params={"older_than_hours": -1},
                              headers=ADMIN), 422, field="older_than_hours")
    assert_problem(client.post("/v1/admin/reservations/release",
                               json={"older_than_hours": 0}, headers=ADMIN),
                   422, field="older_than_hours")
    # Found by the fuzzer: an age past the calendar was a 500 (timedelta overflow).
    assert_problem(client.get("/v1/admin/reservations", params={"older_than_hours": 1e300},
                              headers=ADMIN), 422, field="older_than_hours")
    assert_problem(client.post("/v1/admin/reservations/release",
                               json={"older_than_hours": 1e12}, headers=ADMIN),
                   422, field="older_than_hours")
    assert_problem(client.post("/v1/admin/reservations/release",
                               json={"tenant": "nobody-here"}, headers=ADMIN),
                   404, detail_contains="nobody-here")
    tenant = create_tenant(client, "res-nosy")
    assert_problem(client.get("/v1/admin/reservations", headers=tenant), 403)
