"""A full decision queue answers 503 + Retry-After (never a silent loss); readiness."""

from __future__ import annotations

import threading

from fastapi.testclient import TestClient

from service.app import create_app
from service.db.engine import downgrade, upgrade
from tests.service.conftest import add_model, assert_problem, create_tenant, decide, make_settings


def test_decide_queue_full_503_retry_after(new_database_url, monkeypatch):
    url = new_database_url()
    settings = make_settings(url, decision_queue_size=2, decision_batch_size=1,
                             decision_enqueue_timeout_s=0.05)
    with TestClient(create_app(settings)) as client:
        model = add_model(client)
        tenant = create_tenant(client)
        writer = client.app.state.routing.writer
        gate = threading.Event()
        original = writer._write

        def blocked(batch):
            gate.wait(10)
            original(batch)

        monkeypatch.setattr(writer, "_write", blocked)
        statuses = [decide(client, tenant, [model], seed=i) for i in range(6)]
        accepted = [r for r in statuses if r.status_code == 200]
        refused = [r for r in statuses if r.status_code != 200]
        assert refused, "a full queue must refuse decisions"
        for r in refused:
            assert_problem(r, 503, detail_contains="retry")
            assert r.headers["retry-after"] == "1"
        gate.set()
        assert writer.flush(10)
        # Every accepted decision was stored; the refused ones reserved no budget.
        usage = client.get("/v1/tenants/me/usage", headers=tenant).json()
        assert usage["decisions_today"] == len(accepted)
        assert decide(client, tenant, [model]).status_code == 200


def test_decide_no_enabled_model_503(new_database_url):
    with TestClient(create_app(make_settings(new_database_url()))) as client:
        tenant = create_tenant(client)
        assert_problem(decide(client, tenant), 503, detail_contains="POST /v1/admin/models")


def test_get_readyz_migrations_behind_503(new_database_url):
    url = new_database_url()
    with TestClient(create_app(make_settings(url))) as client:
        assert client.get("/readyz").status_code == 200
        downgrade(url, "base")
        assert_problem(client.get("/readyz"), 503, detail_contains="migrate")
        assert client.get("/healthz").status_code == 200
        upgrade(url)
        assert client.get("/readyz").status_code == 200
