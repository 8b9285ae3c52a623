"""PostgreSQL stopped while a gateway's default quality waits (service/quality_defaults.py),
and a client's quality for that call comes to a replica whose cached settings say the
tenant has no defaults (another replica recorded it; this one has not reloaded): the
quality is buffered (service/spool.py), and claims the default when it is drained.

Before, the claim's lookup counted the database's absence as "no default": the buffered
quality was stored as it came back, and the default was learned too when its wait was
over: two qualities for one call.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from service.db import models as m
from service.quality_defaults import QualityDefaults, Recorded
from tests.faults.conftest import PrivatePostgres, serve
from tests.faults.test_postgres_outage import buffered_settings
from tests.service.conftest import ADMIN, embedding

DUE_S = 25.0  # the default's wait: over after the outage and the drain


@pytest.fixture(scope="module")
def outage(private_postgres: PrivatePostgres,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pg = private_postgres
    settings = buffered_settings(pg, tmp_path_factory)
    seen: dict[str, Any] = {}
    with serve(settings) as (base, app), httpx.Client(base_url=base, timeout=30) as http:
        assert http.post("/v1/admin/models", headers=ADMIN, json={
            "name": "qo-m1", "input_price_per_mtok": 1.0,
            "output_price_per_mtok": 2.0}).status_code == 201
        key = http.post("/v1/admin/tenants", headers=ADMIN,
                        json={"name": "qo"}).json()["api_key"]
        auth = {"Authorization": f"Bearer {key}"}
        decision = http.post("/v1/decide", headers=auth,
                             json={"query": {"embedding": embedding(1)}}).json()["decision_id"]
        tenant_id = app.state.routing.tenant_for_key(key).id
        engine = app.state.routing.engine
        assert app.state.gateway.settings.get(tenant_id).records_defaults is False
        # Another replica records the call's default (this one's settings are not told).
        other = QualityDefaults(engine, lambda _: True, lambda _: DUE_S, print)
        deadline = time.monotonic() + 10
        while True:  # the decision row first (the writer's batch)
            try:
                other.record([Recorded(tenant_id, decision, 0.7,
                                       m.utcnow() + timedelta(seconds=DUE_S))])
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        due = time.monotonic() + DUE_S
        pg.stop()
        seen["rating"] = http.post("/v1/feedback", headers=auth, json={
            "decision_id": decision, "quality": 0.3, "latency_ms": 9.0,
            "event_id": "rating"})
        pg.start()
        deadline = time.monotonic() + 60
        while app.state.routing.feedback_buffered():
            assert time.monotonic() < deadline, "the buffer did not drain"
            time.sleep(0.2)
        time.sleep(max(due - time.monotonic(), 0.0) + 2.0)  # the applier's chance
        with Session(engine) as session:
            row = session.get(m.QualityDefault, decision)
            seen["row"] = (row.state, row.event_id)
        seen["feedback"] = {f["event_id"]: f["quality"] for f in http.get(
            f"/v1/decisions/{decision}", headers=auth).json()["feedback"]}
    return seen


def test_buffered_quality_claims_the_default_when_drained(outage: dict[str, Any]) -> None:
    r = outage["rating"]
    assert r.status_code == 202 and r.json()["status"] == "buffered", r.text
    assert outage["feedback"] == {"rating": 0.3}  # one quality: the client's
    assert outage["row"] == ("replaced", "rating")
