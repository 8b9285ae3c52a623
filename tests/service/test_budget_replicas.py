"""Budgets across API replicas on one database.

Without leases (embedded mode's default; SQLite file and PostgreSQL): what one replica
spends counts against the budget on the other after a registry refresh
(``RoutingService.sync_spend``), and reconciliation by feedback flows through too.

With leases (service/budget_lease.py; distributed mode's default): real replica
processes on the real PostgreSQL never spend more than the budget together, and one
killed with ``kill -9`` loses at most the slice it held."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.budget import Ledger, period_keys
from service.budget_lease import BudgetLeases, budget_leases
from service.db.engine import upgrade
from tests.service.conftest import (
    _pg_admin_conninfo,
    _postgres_factory,
    add_model,
    assert_problem,
    create_tenant,
    decide,
    embedding,
    make_settings,
)
from tests.service.test_budget import PRICEY, set_prefs
from tests.service.test_kill import free_port, start


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


# --------------------------------------------------------------------------------------
# Budget leases (service/budget_lease.py): real replicas (``bandit-router serve``
# processes) against the real PostgreSQL, as the issue measured them: a tenant with
# budget_usd_per_day=0.3 and on_budget_exhausted=reject, 4 threads per replica deciding
# on a model reserving $0.006. Without leases each replica spent the whole budget.
BUDGET, THREADS_PER_REPLICA, REQUESTS_PER_THREAD = 0.3, 4, 40
LEASES_ON = {"BANDIT_ROUTER_BUDGET_LEASES": "true"}


@pytest.fixture(scope="module")
def pg_url() -> Iterator[Callable[[], str]]:
    with _postgres_factory() as factory:
        yield factory


def _pool_granted(url: str, tenant_id: str) -> float:
    with psycopg.connect(_pg_admin_conninfo(url)[0]) as conn:
        row = conn.execute("SELECT granted_usd FROM budget_pools WHERE tenant_id = %s"
                           " AND length(period_key) = 10", (tenant_id,)).fetchone()
    return float(row[0]) if row else 0.0


def _burst(bases: list[str], tenant: dict[str, str], model: str) -> list[int]:
    """THREADS_PER_REPLICA threads per replica, each sending REQUESTS_PER_THREAD decides
    as fast as it can; returns the decisions accepted per replica."""
    accepted = [0] * len(bases)
    lock = threading.Lock()
    headers = {"Authorization": tenant["Authorization"]}

    def worker(i: int, seed: int) -> None:
        with httpx.Client(base_url=bases[i], timeout=30) as http:
            for k in range(REQUESTS_PER_THREAD):
                r = http.post("/v1/decide", headers=headers, json={
                    "query": {"embedding": embedding(seed * 1000 + k)},
                    "candidates": [model]})
                assert r.status_code in (200, 429), r.text
                if r.status_code == 200:
                    with lock:
                        accepted[i] += 1

    threads = [threading.Thread(target=worker, args=(i, i * 10 + t))
               for i in range(len(bases)) for t in range(THREADS_PER_REPLICA)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return accepted


def _budgeted_tenant(base: str) -> tuple[dict[str, str], str]:
    with httpx.Client(base_url=base, timeout=10) as http:
        model = add_model(http, "pricey", *PRICEY[:2])
        tenant = create_tenant(http, "burst")
        r = http.put("/v1/tenants/me/preferences", headers=tenant, json={
            "budget_usd_per_day": BUDGET, "on_budget_exhausted": "reject"})
        assert r.status_code == 200, r.text
    return tenant, model


@pytest.mark.parametrize("replicas", [2, 4])
def test_budget_leases_hold_across_replicas_under_burst(pg_url, replicas):
    url = pg_url()
    ports = [free_port() for _ in range(replicas)]
    procs = [start(url, ports[0], LEASES_ON, timeout_s=120.0)]
    try:
        tenant, model = _budgeted_tenant(f"http://127.0.0.1:{ports[0]}")
        # Started at once (a loaded machine takes a while to import the service).
        with ThreadPoolExecutor(len(ports)) as pool:
            procs += pool.map(lambda port: start(url, port, LEASES_ON, timeout_s=120.0),
                              ports[1:])
        accepted = _burst([f"http://127.0.0.1:{p}" for p in ports], tenant, model)
    finally:
        for proc in procs:
            proc.terminate()  # a clean stop writes the queued decisions
        for proc in procs:
            proc.wait(30)
    spent = sum(accepted) * PRICEY[2]
    print(f"{replicas} replicas accepted {accepted}: ${spent:.3f} of ${BUDGET}")
    with psycopg.connect(_pg_admin_conninfo(url)[0]) as conn:
        stored = conn.execute("SELECT count(*), coalesce(sum(charged_usd), 0) FROM decisions"
                              " WHERE tenant_id = %s", (tenant["X-Tenant"],)).fetchone()
    assert stored[0] == sum(accepted)
    assert float(stored[1]) == pytest.approx(spent, rel=1e-9)
    # The bound (service/budget_lease.py): reservations never exceed the budget. Each
    # replica alone would have accepted 50 (the issue: 49 each, 1.96x with 2 replicas).
    assert spent <= BUDGET * (1 + 1e-9), (accepted, spent)
    # ... and the budget is spent: at most one unusable remainder (< $0.006) per replica
    # is left in the slices, the stopped replicas returned the rest.
    assert sum(accepted) >= int(BUDGET / PRICEY[2] + 1e-9) - replicas, accepted
    assert _pool_granted(url, tenant["X-Tenant"]) <= BUDGET * (1 + 1e-9)


def test_budget_lease_replica_killed_loses_at_most_its_slice(pg_url):
    url = pg_url()
    port_a, port_b = free_port(), free_port()
    proc_a = start(url, port_a, LEASES_ON, timeout_s=120.0)
    killed = False
    try:
        tenant, model = _budgeted_tenant(f"http://127.0.0.1:{port_a}")
        headers = {"Authorization": tenant["Authorization"]}
        with httpx.Client(base_url=f"http://127.0.0.1:{port_a}", timeout=10) as http:
            spent_a = 0.0
            for k in range(10):
                r = http.post("/v1/decide", headers=headers, json={
                    "query": {"embedding": embedding(k)}, "candidates": [model]})
                # 429 only when the slice ran out before the lease thread topped it up.
                assert r.status_code in (200, 429), r.text
                spent_a += PRICEY[2] if r.status_code == 200 else 0.0
        assert spent_a > 0
        time.sleep(0.5)  # the lease thread tops the slice up after the spending
        granted = _pool_granted(url, tenant["X-Tenant"])
        held_a = granted - spent_a  # only replica a has leased so far
        assert held_a > 0, granted
        proc_a.send_signal(signal.SIGKILL)
        proc_a.wait(10)
        killed = True
        proc_b = start(url, port_b, LEASES_ON, timeout_s=120.0)
        try:
            accepted_b = _burst([f"http://127.0.0.1:{port_b}"], tenant, model)[0]
        finally:
            proc_b.terminate()
            proc_b.wait(30)
    finally:
        if not killed:
            proc_a.kill()
            proc_a.wait(10)
    total = spent_a + accepted_b * PRICEY[2]
    print(f"killed replica held ${held_a:.4f}; spent ${total:.3f} of ${BUDGET}")
    assert total <= BUDGET * (1 + 1e-9), (spent_a, accepted_b)
    # What the killed replica held is lost to the day's budget, and no more (besides
    # the last unusable remainder under one reservation).
    assert BUDGET - total <= held_a + PRICEY[2] + 1e-9, (BUDGET - total, held_a)
    assert BUDGET - total >= held_a - 1e-9 - PRICEY[2], (BUDGET - total, held_a)


def test_ledger_leased_reserves_only_from_its_slice():
    ledger = Ledger(budget_day=1.0, budget_month=None, leased=True)
    woken: list[int] = []
    ledger.wake = lambda: woken.append(1)
    now = time.time()
    day = period_keys(now)[0]
    assert not ledger.try_reserve(0.1, now=now)  # nothing leased yet
    assert ledger.short == 0.1 and woken  # the lease thread is asked for a slice
    ledger.credit("day", day, 0.25, 0.25, slice_usd=0.25)
    assert ledger.short == 0.0
    assert ledger.try_reserve(0.1, now=now) and ledger.try_reserve(0.1, now=now)
    assert not ledger.try_reserve(0.1, now=now)  # 0.05 left in the slice
    assert ledger.held() == pytest.approx(0.05)
    ledger.unreserve(0.1, now, now=now)  # a decision never answered: back to the slice
    assert ledger.held() == pytest.approx(0.15)
    assert ledger.snapshot(now)[0] == pytest.approx(0.1)
    # A forced (cheapest fallback) reservation takes nothing from the slice.
    assert ledger.try_reserve(0.5, now=now, force=True)
    assert ledger.held() == pytest.approx(0.15)
    ledger.unreserve(0.5, now, from_slice=False, now=now)
    assert ledger.held() == pytest.approx(0.15)
    # Yesterday's slice is void.
    tomorrow = now + 86_400.0
    assert not ledger.try_reserve(0.01, now=tomorrow)


def test_ledger_leased_paces_on_the_global_spend():
    now = time.time()
    day = period_keys(now)[0]
    alone = Ledger(budget_day=1.0, budget_month=None, leased=True)
    alone.credit("day", day, 0.2, 0.2)
    shared = Ledger(budget_day=1.0, budget_month=None, leased=True)
    shared.credit("day", day, 0.2, 0.9)  # other replicas leased 0.7 of the budget
    # Same local spend (none), but 0.7 of the budget is gone elsewhere: pacing rises.
    assert alone.paced_cost_weight(1.0, 1.0, now=now) == 1.0
    assert shared.paced_cost_weight(1.0, 1.0, now=now) > 2.0


def test_budget_leases_setting_needs_postgresql():
    assert budget_leases(make_settings("sqlite:///x.db"), "sqlite") is None
    assert budget_leases(make_settings("postgresql+psycopg://u@h/db",
                                       kafka_bootstrap="h:9092"), "postgresql") is not None
    with pytest.raises(ValueError, match="budget_leases needs a PostgreSQL"):
        budget_leases(make_settings("sqlite:///x.db", budget_leases=True), "sqlite")


def test_budget_pool_concurrent_leases_never_exceed_budget(pg_url):
    """Two lease components (two replicas) leasing at once from the real PostgreSQL: the
    grants add up to the pool's granted_usd, which never passes the budget."""
    url = pg_url()
    upgrade(url)
    tenant = "t-" + uuid.uuid4().hex[:8]
    ledgers = [Ledger(budget_day=1.0, budget_month=None, leased=True) for _ in range(2)]
    components = [BudgetLeases(url, interval_s=3600.0) for _ in range(2)]
    day = period_keys(time.time())[0]

    # The two lease in rounds, each round's two leases at once (they race for the pool's
    # row lock). Started together only, one thread could lease the whole budget (23
    # leases) before the other's first one on a busy machine: a correct zero slice for
    # the late one, but no concurrency tested (and `all(h > 0)` failed, issue 17).
    rounds = threading.Barrier(2)

    def lease_many(i: int) -> None:
        for _ in range(30):
            rounds.wait(30)
            components[i]._lease(tenant, ledgers[i], "day", day, 1.0, 0.05, 0.01, 0.05)

    threads = [threading.Thread(target=lease_many, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    held = [ledger.held() for ledger in ledgers]
    assert sum(held) == pytest.approx(_pool_granted(url, tenant), abs=1e-9)
    assert sum(held) <= 1.0 + 1e-9 and sum(held) >= 1.0 - 0.01  # floor-sized remainder
    assert all(h > 0 for h in held)
    # What a replica returns goes back to the pool; the other may lease it.
    components[0]._give_back(tenant, ledgers[0], "day", day, None)
    assert ledgers[0].held() == 0.0
    assert _pool_granted(url, tenant) == pytest.approx(held[1], abs=1e-9)
    for c in components:
        if c._conn is not None:
            c._conn.close()
