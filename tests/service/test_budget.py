"""Budgets: atomic reservation under concurrency, reject / cheapest, reconciliation and
pacing, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from bandit import Preferences
from service.errors import domain_problem
from tests.service.conftest import add_model, assert_problem, create_tenant, decide

# 500 input + 300 output tokens: 3 and 15 USD per Mtok -> 0.006 USD predicted per request.
PRICEY = (3.0, 15.0, 0.006)
CHEAP = (0.1, 0.4, 0.00017)


def set_prefs(client, tenant, **body):
    r = client.put("/v1/tenants/me/preferences", json=body, headers=tenant)
    assert r.status_code == 200, r.text
    return r.json()


def spend(client, tenant) -> float:
    return client.get("/v1/tenants/me/usage", headers=tenant).json()["spend_usd_today"]


def test_decide_budget_exhausted_concurrent_http_never_overspends(client):
    model = add_model(client, None, *PRICEY[:2])
    tenant = create_tenant(client)
    set_prefs(client, tenant, budget_usd_per_day=0.05, on_budget_exhausted="reject")

    def one(i: int):
        return decide(client, tenant, [model], seed=i)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(40)))
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code != 200]
    # 8 * 0.006 = 0.048 fits a 0.05 budget, a ninth does not.
    assert len(ok) == 8
    for r in refused:
        assert_problem(r, 429, detail_contains="budget")
        assert r.headers["retry-after"]
    assert spend(client, tenant) == pytest.approx(8 * PRICEY[2], rel=1e-9)
    assert spend(client, tenant) <= 0.05


def test_decide_budget_concurrent_threads_reserve_atomically(client):
    """Many threads deciding at once (no event loop in between) cannot overspend."""
    model = add_model(client, None, *PRICEY[:2])
    tenant = create_tenant(client)
    set_prefs(client, tenant, budget_usd_per_day=0.1, on_budget_exhausted="reject")
    service = client.app.state.routing
    state = service.tenant_for_key(tenant["Authorization"].split()[1])
    x = np.full(8, 0.3)
    barrier = threading.Barrier(12)
    results: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        for _ in range(5):
            try:
                pending = service.decide(state, x, [model], None)
            except Exception as exc:
                assert domain_problem(exc).status == 429
                ok = False
            else:
                assert service.enqueue(pending)
                ok = True
            with lock:
                results.append(ok)

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 16  # floor(0.1 / 0.006)
    day, month = state.ledger.snapshot()
    assert day <= 0.1 and day == pytest.approx(16 * PRICEY[2], rel=1e-9)


def test_decide_budget_exhausted_cheapest_fallback(client):
    pricey = add_model(client, None, *PRICEY[:2], prior_quality=0.95)
    cheap = add_model(client, None, *CHEAP[:2], prior_quality=0.2)
    tenant = create_tenant(client)
    set_prefs(client, tenant, budget_usd_per_day=0.0, on_budget_exhausted="cheapest")
    r = decide(client, tenant, [pricey, cheap])
    assert r.status_code == 200
    body = r.json()
    assert body["model"] == cheap and body["budget_limited"] is True
    assert body["propensity"] == 1.0 and body["explored"] is False


def test_decide_budget_fallback_to_cheapest_that_fits(client):
    """When the policy's choice does not fit, the cheapest candidate that fits is used."""
    pricey = add_model(client, None, *PRICEY[:2], prior_quality=0.95)
    cheap = add_model(client, None, *CHEAP[:2], prior_quality=0.2)
    tenant = create_tenant(client)
    set_prefs(client, tenant, budget_usd_per_day=0.001, on_budget_exhausted="reject")
    body = decide(client, tenant, [pricey, cheap]).json()
    assert body["model"] == cheap and body["budget_limited"] is True


def test_post_feedback_reconciles_spend(client):
    model = add_model(client, None, *PRICEY[:2])
    tenant = create_tenant(client)
    d = decide(client, tenant, [model]).json()
    assert spend(client, tenant) == pytest.approx(PRICEY[2], rel=1e-9)
    r = client.post("/v1/feedback", json={"decision_id": d["decision_id"], "cost_usd": 0.001,
                                          "event_id": "cost"}, headers=tenant)
    assert r.status_code == 202
    assert spend(client, tenant) == pytest.approx(0.001, rel=1e-9)
    # A second cost report replaces the first, it does not add to it.
    client.post("/v1/feedback", json={"decision_id": d["decision_id"], "cost_usd": 0.002,
                                      "event_id": "cost-2"}, headers=tenant)
    assert spend(client, tenant) == pytest.approx(0.002, rel=1e-9)


def test_decide_pacing_raises_cost_weight(client):
    """Past half the budget the cost weight rises (service.budget's pacing rule)."""
    model = add_model(client, None, *PRICEY[:2])
    tenant = create_tenant(client)
    set_prefs(client, tenant, budget_usd_per_day=0.01)
    first = decide(client, tenant, [model]).json()["predictions"][model]
    assert first["utility"] == pytest.approx(first["quality"], abs=1e-12)
    second = decide(client, tenant, [model]).json()["predictions"][model]
    # spent 0.006 of 0.01: f = 0.6, p = 0.04, cost' = 0 * (1 + 9p) + p * 1 / 0.004 = 10
    assert second["utility"] == pytest.approx(second["quality"] - 10.0 * PRICEY[2],
                                              rel=1e-9)


def test_ledger_paced_weight_rule():
    from bandit.base import MAX_WEIGHT
    from service.budget import Ledger

    ledger = Ledger(budget_day=1.0, budget_month=None)
    assert ledger.paced_cost_weight(1.0, 2.0, now=0.0) == 2.0
    ledger.try_reserve(1.0, now=0.0)
    # Exhausted: p = 1, cost' = 2 * 10 + 1 / 1e-6, capped at bandit's largest weight.
    assert ledger.paced_cost_weight(1.0, 2.0, now=0.0) == MAX_WEIGHT
    assert Preferences(1.0, ledger.paced_cost_weight(1.0, 2.0, now=0.0)).validated()
    # A new UTC day starts from zero.
    assert ledger.try_reserve(0.5, now=86_400.0)
    assert ledger.snapshot(now=86_400.0) == (0.5, 1.5)
