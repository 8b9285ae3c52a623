"""Start-up and background work: the generated admin key, periodic checkpoints."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.app import create_app
from service.db.models import PolicyCheckpoint
from tests.service.conftest import add_model, create_tenant, decide, make_settings


def test_start_admin_key_generated_once(new_database_url, capsys):
    url = new_database_url()
    settings = make_settings(url, admin_key=None)
    with TestClient(create_app(settings)) as c1:
        key = c1.app.state.generated_admin_key
        assert key and key.startswith("bra_")
        r = c1.post("/v1/admin/tenants", json={"name": "t"},
                    headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 201
    assert key in capsys.readouterr().err
    with TestClient(create_app(settings)) as c2:
        assert c2.app.state.generated_admin_key is None
        r = c2.post("/v1/admin/tenants", json={"name": "t2"},
                    headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 201
    assert key not in capsys.readouterr().err


def test_checkpoint_periodic_and_pruned(new_database_url):
    url = new_database_url()
    settings = make_settings(url, checkpoint_interval_s=0.05, checkpoints_kept=2)
    with TestClient(create_app(settings)) as client:
        service = client.app.state.routing
        model = add_model(client)
        tenant = create_tenant(client)
        for i in range(6):
            d = decide(client, tenant, [model], seed=i).json()["decision_id"]
            client.post("/v1/feedback", json={"decision_id": d, "quality": 0.5},
                        headers=tenant)
            time.sleep(0.12)
        deadline = time.monotonic() + 10
        while True:  # the periodic task catches up with the last feedback
            with Session(service.engine) as session:
                count = session.scalar(select(func.count()).select_from(PolicyCheckpoint))
                newest = session.scalar(select(func.max(PolicyCheckpoint.last_feedback_id)))
            if newest == service.last_feedback_id or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert count == 2
        assert newest == service.last_feedback_id
        assert service.metrics.checkpoints._value.get() >= 3
