"""Embedded mode on PostgreSQL prunes migration 0010's ``guard_changes`` log (issue 17):
its trigger logs every guarded decision whatever the mode, and no follower reads it
here, so the guards prune it, driven by the guarded decisions themselves."""

from __future__ import annotations

import time

import psycopg
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import (
    ADMIN,
    add_model,
    create_tenant,
    decide,
    make_settings,
)
from tests.streams.conftest import libpq_url


def _old_change(conn: psycopg.Connection, tenant_id: str, hours: float) -> None:
    conn.execute(
        "INSERT INTO guard_changes (at, tenant_id, decision_id, decision_at, record,"
        " counted_before, counted_after) VALUES (now() - %s * interval '1 hour', %s,"
        " 'old', now(), '[]', false, true)", (hours, tenant_id))


def _ages(conn: psycopg.Connection) -> list[str]:
    return [d for (d,) in conn.execute(
        "SELECT decision_id FROM guard_changes ORDER BY id").fetchall()]


def test_embedded_postgres_prunes_guard_changes(backend: str, new_database_url) -> None:
    if backend != "postgresql":
        pytest.skip("SQLite keeps no guard_changes log (migration 0010 is PostgreSQL only)")
    url = new_database_url()
    with TestClient(create_app(make_settings(url))) as client, \
            psycopg.connect(libpq_url(url), autocommit=True) as conn:
        routing = client.app.state.routing
        for name in ("p-a", "p-b"):
            add_model(client, name)
        tenant = create_tenant(client, "guard-prune")
        r = client.put("/v1/admin/tenants/" + tenant["X-Tenant"] + "/preferences",
                       json={"baseline_model": "p-a", "max_exploration_loss": 0.03},
                       headers=ADMIN)
        assert r.status_code == 200, r.text
        guards = routing.guards
        clock = [0.0]
        guards.clock = lambda: clock[0]
        guards._last_prune = -1e18  # noqa: SLF001 - as at start: the first decision prunes
        _old_change(conn, tenant["X-Tenant"], 2.0)  # older than keep_s (1 h)
        _old_change(conn, tenant["X-Tenant"], 0.5)  # younger: kept
        assert _ages(conn).count("old") == 2

        def settled(want_old: int) -> list[str]:
            deadline = time.monotonic() + 10
            while True:
                ages = _ages(conn)
                if ages.count("old") == want_old or time.monotonic() > deadline:
                    return ages
                time.sleep(0.05)

        for i in range(3):
            assert decide(client, tenant, seed=i).status_code == 200
        ages = settled(1)
        assert ages.count("old") == 1  # the 2 h old change is gone, the 0.5 h one kept
        # The guarded decisions were logged (and kept): the trigger writes in this mode.
        deadline = time.monotonic() + 10
        while len(_ages(conn)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_ages(conn)) >= 4
        # At most every prune_every_s: a second old change waits for the next period.
        _old_change(conn, tenant["X-Tenant"], 3.0)
        assert decide(client, tenant, seed=9).status_code == 200
        time.sleep(0.3)
        assert _ages(conn).count("old") == 2
        clock[0] += guards.prune_every_s
        assert decide(client, tenant, seed=10).status_code == 200
        assert settled(1).count("old") == 1
