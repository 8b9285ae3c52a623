"""Budgets across API replicas on one database (SQLite file and PostgreSQL): what one
replica spends counts against the budget on the other after a registry refresh
(``RoutingService.sync_spend``), and reconciliation by feedback flows through too."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import add_model, assert_problem, create_tenant, decide, make_settings
from tests.service.test_budget import PRICEY, set_prefs


@contextmanager
def two_replicas(url: str) -> Iterator[tuple[TestClient, TestClient]]:
    """Two apps on one database; registry_refresh_s is long: the tests drive the
    refresh themselves."""
    with TestClient(create_app(make_settings(url, registry_refresh_s=3600.0))) as a, \
            TestClient(create_app(make_settings(url, registry_refresh_s=3600.0))) as b:
        yield a, b


def refresh(client: TestClient) -> None:
    service = client.app.state.routing
    service.writer.flush()
    service.refresh_registry()


def test_budget_holds_across_two_replicas(new_database_url):
    with two_replicas(new_database_url()) as (a, b):
        model = add_model(a, None, *PRICEY[:2])
        tenant = create_tenant(a)
        refresh(b)  # b learns the model and the tenant
        set_prefs(a, tenant, budget_usd_per_day=0.05, on_budget_exhausted="reject")
        refresh(b)
        # 8 x 0.006 = 0.048 fits in 0.05: replica a spends 6 of them.
        for i in range(6):
            assert decide(a, tenant, [model], seed=i).status_code == 200
        refresh(a)
        refresh(b)
        ledger_b = b.app.state.routing.tenants[tenant["X-Tenant"]].ledger
        assert ledger_b.snapshot()[0] == pytest.approx(6 * PRICEY[2], rel=1e-9)
        # Two more fit in total, whichever replica serves them; the ninth does not.
        assert decide(b, tenant, [model], seed=10).status_code == 200
        assert decide(b, tenant, [model], seed=11).status_code == 200
        assert_problem(decide(b, tenant, [model], seed=12), 429, detail_contains="budget")
        b.app.state.routing.writer.flush()  # b's two decisions reach the database
        refresh(a)
        assert_problem(decide(a, tenant, [model], seed=13), 429, detail_contains="budget")
        assert a.app.state.routing.tenants[tenant["X-Tenant"]].ledger.snapshot()[0] == \
            pytest.approx(8 * PRICEY[2], rel=1e-9)


def test_feedback_cost_on_one_replica_frees_budget_on_other(new_database_url):
    with two_replicas(new_database_url()) as (a, b):
        model = add_model(a, None, *PRICEY[:2])
        tenant = create_tenant(a)
        set_prefs(a, tenant, budget_usd_per_day=0.05, on_budget_exhausted="reject")
        ids = [decide(a, tenant, [model], seed=i).json()["decision_id"] for i in range(8)]
        a.app.state.routing.writer.flush()
        refresh(b)
        assert_problem(decide(b, tenant, [model], seed=20), 429, detail_contains="budget")
        # The real cost of four decisions was far below the prediction (reported to a).
        for decision_id in ids[:4]:
            r = a.post("/v1/feedback", json={"decision_id": decision_id, "cost_usd": 0.0001},
                       headers=tenant)
            assert r.status_code == 202, r.text
        refresh(b)
        expected = 4 * PRICEY[2] + 4 * 0.0001
        assert b.app.state.routing.tenants[tenant["X-Tenant"]].ledger.snapshot()[0] == \
            pytest.approx(expected, rel=1e-9)
        assert decide(b, tenant, [model], seed=21).status_code == 200
