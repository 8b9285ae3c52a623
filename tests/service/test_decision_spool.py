"""Decisions as durable as feedback (issue 14, items 1, 2 and 7).

* While the database is unreachable a decision is committed to the local decision spool
  (``service/spool.py``) before it is answered, and written, in order, once the
  database is back; feedback about it is buffered and applied after it.
* ``BANDIT_ROUTER_DECISION_DURABILITY=write-through`` answers a decide only once its row
  is committed; ``batched`` (the default) answers once it is queued.
* A start while the database is unreachable serves, degraded, from the local state
  (registry and newest checkpoint), and reloads from the database when it answers.
* ``/readyz`` makes what waits for the database retry at once when it reaches it: ready
  right after the outage, not at the end of a backoff.

The outage is in-process (every statement fails, as for a refused connection; SQLite
and PostgreSQL), or a TCP proxy to PostgreSQL that the test cuts (the restart).
``tests/faults/test_kill_during_outage.py`` does the same with ``kill -9`` of a real
server on a stopped PostgreSQL.
"""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from service.app import create_app
from service.db import models as m
from tests.service.conftest import (
    ADMIN,
    add_model,
    create_tenant,
    decide,
    embedding,
    make_settings,
)
from tests.service.test_feedback_buffer import (
    CutProxy,
    app_client,
    database_down,
    postgres_database,  # noqa: F401, F811 - a fixture
    routing,
)

OUTAGE_S = 7.0  # long enough for the retries' backoff to reach seconds


def _ready_within(client: TestClient, seconds: float) -> float | None:
    """Seconds until /readyz says ready (polled every 50 ms), None if it did not."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if client.get("/readyz").json() == {"status": "ready"}:
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def test_outage_decisions_spooled_then_written_and_their_feedback_applied(
        new_database_url, tmp_path):
    with app_client(new_database_url(), tmp_path, outage_retry_s=60.0) as client:
        add_model(client, "sp-a")
        tenant = create_tenant(client, "spool")
        service = routing(client)
        with database_down(service.engine):
            # Answered from the queue until the writer's first INSERT fails (the bound
            # of the batched mode), then spooled.
            first = decide(client, tenant, seed=100).json()["decision_id"]
            deadline = time.monotonic() + 5
            while not service.writer.spooling():
                assert time.monotonic() < deadline, "the writer never spooled"
                time.sleep(0.01)
            ids = []
            for i in range(6):
                r = decide(client, tenant, seed=i)
                assert r.status_code == 200, r.text
                ids.append(r.json()["decision_id"])
                # On disk before the answer.
                assert ids[-1] in service.writer.spool.ids()
            assert first in service.writer.spool.ids()
            assert list(tmp_path.glob("decision-spool-*.sqlite3"))
            answers = [client.post("/v1/feedback", headers=tenant, json={
                "decision_id": d, "event_id": f"s{i}", "quality": 0.25})
                for i, d in enumerate(ids)]
            assert {a.json()["status"] for a in answers} == {"buffered"}
            readyz = client.get("/readyz").json()
            assert readyz["status"] == "degraded", readyz
            time.sleep(OUTAGE_S)
        # The retries are seconds apart by now (up to 60 s); /readyz reaching the
        # database makes them retry at once.
        assert _ready_within(client, 5.0) is not None, client.get("/readyz").json()
        assert not service.writer.spooling()
        for d in ids:
            stored = client.get(f"/v1/decisions/{d}", headers=tenant).json()
            assert [f["quality"] for f in stored["feedback"]] == [0.25]
    assert not list(tmp_path.glob("decision-spool-*")), "the replayed spool remains"


@pytest.mark.parametrize(("durability", "stored_at_answer"),
                         [("write-through", True), ("batched", False)])
def test_decision_durability_write_through_answers_after_commit(
        new_database_url, tmp_path, durability, stored_at_answer):
    # A writer that waits 30 s for rows to gather: only write-through hurries it.
    with app_client(new_database_url(), tmp_path, decision_durability=durability,
                    decision_flush_interval_s=30.0) as client:
        add_model(client, "wt-a")
        tenant = create_tenant(client, "wt")
        service = routing(client)
        time.sleep(0.1)  # the writer thread is waiting for rows
        r = decide(client, tenant)
        assert r.status_code == 200
        with Session(service.engine) as session:
            row = session.get(m.DecisionRow, r.json()["decision_id"])
        assert (row is not None) is stored_at_answer


def test_restart_during_outage_serves_degraded_then_reloads(postgres_database,  # noqa: F811
                                                           tmp_path):
    target = make_url(postgres_database)
    proxy = CutProxy((target.host or "127.0.0.1", target.port or 5432))
    url = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = make_settings(url, data_dir=tmp_path, feedback_buffer_dir=tmp_path,
                             registry_refresh_s=3600.0)
    probe = {"query": {"embedding": embedding(99)}, "candidates": ["rs-small", "rs-large"]}
    try:
        with TestClient(create_app(settings)) as client:
            add_model(client, "rs-small", 0.2, 0.8)
            add_model(client, "rs-large", 5.0, 20.0)
            tenant = create_tenant(client, "restart")
            for i in range(8):
                d = decide(client, tenant, seed=i).json()
                assert client.post("/v1/feedback", headers=tenant, json={
                    "decision_id": d["decision_id"], "quality": 0.9}).status_code == 202
            before = client.post("/v1/decide", headers=tenant, json=probe).json()
        # Stopped cleanly: its final checkpoint is in the local state too.
        proxy.down()
        with TestClient(create_app(settings)) as client:
            readyz = client.get("/readyz").json()
            assert readyz["status"] == "degraded" and "unreachable" in readyz["database"]
            after = client.post("/v1/decide", headers=tenant, json=probe)
            assert after.status_code == 200, after.text
            for model in ("rs-small", "rs-large"):
                assert after.json()["predictions"][model]["quality"] == pytest.approx(
                    before["predictions"][model]["quality"], abs=1e-9)
            assert client.get("/v1/admin/models", headers=ADMIN).status_code == 503
            late = client.post("/v1/feedback", headers=tenant, json={
                "decision_id": after.json()["decision_id"], "event_id": "late",
                "quality": 0.1})
            assert late.json()["status"] == "buffered"
            proxy.restore()
            assert _ready_within(client, 15.0) is not None, client.get("/readyz").json()
            stored = client.get(f"/v1/decisions/{after.json()['decision_id']}",
                                headers=tenant).json()
            assert [f["event_id"] for f in stored["feedback"]] == ["late"]
            service = routing(client)
            assert service.degraded_since is None
            with Session(service.engine) as session:
                rows = session.scalars(select(m.Feedback.quality)).all()
            # The policies are the database's again: 9 feedback rows, each counted once.
            assert len(rows) == 9
            counts = service.shared["linucb"]._stats.count[:, 0]
            assert int(counts.sum()) == 9
    finally:
        proxy.close()


def test_restart_during_outage_without_local_state_fails(postgres_database,  # noqa: F811
                                                        tmp_path):
    target = make_url(postgres_database)
    proxy = CutProxy((target.host or "127.0.0.1", target.port or 5432))
    url = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    proxy.down()
    try:
        with pytest.raises(Exception, match="(?i)connect|refused|closed|server"), \
                TestClient(create_app(make_settings(url, data_dir=tmp_path))):
            pass
    finally:
        proxy.close()
