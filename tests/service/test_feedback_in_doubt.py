"""Commits in doubt (stored, their answer lost) settled by later batches: the review of
rel14's reproducers, as tests. Each failed on rel14 before its fix: the settled entry kept
for good (and scanned on every batch), the same event twice in one batch learned twice,
a retry behind a later row applied after it (a replay applies in id order)."""
from __future__ import annotations

from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Insert
from sqlalchemy.exc import OperationalError

from service import ingest_rows
from service.db import models as m
from service.ingest import Incoming
from service.ingest_rows import IN_DOUBT, Uncertain, settled
from tests.service.conftest import ADMIN, add_model, create_tenant
from tests.service.test_feedback_buffer import (
    app_client,
    lose_the_answer_of_a_feedback_commit,
    quality_count,
    routing,
    send,
    written_decision,
)


def fail_commit_without_landing(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The commit of a feedback row raises a connection error and does NOT land."""
    real_execute = Connection.execute
    lost: list[bool] = []

    def execute(self: Connection, statement: Any, *args: Any, **kwargs: Any) -> Any:
        result = real_execute(self, statement, *args, **kwargs)
        if isinstance(statement, Insert) and statement.table.name == "feedback":
            self.info["inserted-feedback"] = True
        return result

    real_commit = Connection.commit

    def commit(self: Connection) -> None:
        if self.info.pop("inserted-feedback", False) and not lost:
            lost.append(True)
            self.rollback()
            raise OperationalError("COMMIT", {}, ConnectionResetError("lost"))
        real_commit(self)

    monkeypatch.setattr(Connection, "execute", execute)
    monkeypatch.setattr(Connection, "commit", commit)
    return lost


def commit_in_doubt(client: TestClient, monkeypatch: pytest.MonkeyPatch,
                    tenant: dict[str, str], decision_id: str, event: str,
                    quality: float = 0.5, landed: bool = True) -> None:
    """Send a feedback whose commit fails with a connection error (503), after landing
    (its answer lost) or not; the fault undone, and checked to have fired."""
    fault = (lose_the_answer_of_a_feedback_commit if landed
             else fail_commit_without_landing)(monkeypatch)
    assert send(client, tenant, decision_id, event, quality=quality).status_code == 503
    monkeypatch.undo()
    assert fault


def test_a_settled_commit_is_no_longer_in_doubt_and_its_retry_answers_applied(
        new_database_url, tmp_path, monkeypatch):
    with app_client(new_database_url(), tmp_path, feedback_buffer_size=0) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        ds = [written_decision(client, tenant, seed=i)["decision_id"] for i in range(6)]
        before = quality_count(client)
        commit_in_doubt(client, monkeypatch, tenant, ds[0], "lost")
        for i, d in enumerate(ds[1:]):
            assert send(client, tenant, d, f"later{i}", quality=0.7).json()["status"] == "applied"
        sink = routing(client).sink
        assert not sink._uncertain  # settled by the first later batch: nothing to scan
        assert len(sink._settled) == 1
        assert quality_count(client) == before + 6
        assert send(client, tenant, ds[0], "lost", quality=0.5).json()["status"] == "applied"
        assert not sink._settled  # answered
        assert send(client, tenant, ds[0], "lost", quality=0.5).json()["status"] == "duplicate"
        assert quality_count(client) == before + 6


def test_settled_commits_kept_for_their_retries_are_bounded(monkeypatch):
    monkeypatch.setattr(ingest_rows, "SETTLED_KEPT", 2)
    tenant = SimpleNamespace(id="t")
    uncertain = {("t", f"d{i}", "e"): Uncertain(0.0, 0.0, datetime(2026, 1, 1, 0, 0, i),
                                                 tenant) for i in range(3)}
    kept: dict = {}
    items = [Incoming(tenant, f"d{i}", "e", IN_DOUBT, uncertain[("t", f"d{i}", "e")].received)
             for i in range(3)]
    rows = [SimpleNamespace(index=i, feedback_id=10 + i) for i in range(3)]
    settled(uncertain, kept, items, rows)  # type: ignore[arg-type]
    assert not uncertain
    assert list(kept) == [("t", "d1", "e"), ("t", "d2", "e")]  # the oldest forgotten


def test_two_in_doubt_then_later_then_retries(new_database_url, tmp_path, monkeypatch):
    with app_client(new_database_url(), tmp_path, feedback_buffer_size=0) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        a, b, c, e = (written_decision(client, tenant, seed=i)["decision_id"] for i in range(4))
        before = quality_count(client)
        commit_in_doubt(client, monkeypatch, tenant, a, "x")
        commit_in_doubt(client, monkeypatch, tenant, b, "x", landed=False)
        commit_in_doubt(client, monkeypatch, tenant, e, "x")
        assert quality_count(client) == before
        assert send(client, tenant, c, "later", quality=0.7).json()["status"] == "applied"
        assert quality_count(client) == before + 3  # a, e settled; b did not land
        for d in (a, e):
            assert send(client, tenant, d, "x", quality=0.5).json()["status"] == "applied"
        assert send(client, tenant, b, "x", quality=0.5).json()["status"] == "applied"
        assert quality_count(client) == before + 4
        for d in (a, b, e):
            assert send(client, tenant, d, "x", quality=0.5).json()["status"] == "duplicate"
        assert quality_count(client) == before + 4
        assert not routing(client).sink._uncertain and not routing(client).sink._settled


def test_same_key_twice_in_one_batch_after_a_lost_commit(new_database_url, tmp_path,
                                                         monkeypatch):
    """Direct store_many (a batch holding the same event twice): applied twice?"""
    with app_client(new_database_url(), tmp_path, feedback_buffer_size=0) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        a = written_decision(client, tenant, seed=0)["decision_id"]
        before = quality_count(client)
        commit_in_doubt(client, monkeypatch, tenant, a, "x")
        service = routing(client)
        t = service.tenants[tenant["X-Tenant"]]
        out = {"quality": 0.5, "cost_usd": None, "latency_ms": None}
        res = service.sink.store_many([Incoming(t, a, "x", out, m.utcnow()),
                                       Incoming(t, a, "x", out, m.utcnow())])
        assert [r.status for r in res] == ["applied", "duplicate"]
        assert quality_count(client) == before + 1


def test_retry_in_a_batch_behind_a_later_row_order(new_database_url, tmp_path, monkeypatch):
    with app_client(new_database_url(), tmp_path, feedback_buffer_size=0) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        a, b = (written_decision(client, tenant, seed=i)["decision_id"] for i in range(2))
        commit_in_doubt(client, monkeypatch, tenant, a, "x")
        service = routing(client)
        sink = service.sink
        order: list[int] = []
        real = type(sink)._apply

        def spy(self, items, rows, results):  # type: ignore[no-untyped-def]
            order.extend(r.feedback_id for r in rows)
            return real(self, items, rows, results)

        monkeypatch.setattr(type(sink), "_apply", spy)
        t = service.tenants[tenant["X-Tenant"]]
        out = {"quality": 0.5, "cost_usd": None, "latency_ms": None}
        res = sink.store_many([Incoming(t, b, "new", out, m.utcnow()),
                               Incoming(t, a, "x", out, m.utcnow())])
        assert [r.status for r in res] == ["applied", "applied"]
        assert len(order) == 2 and order == sorted(order)  # a replay's order


def test_a_retry_that_stores_anew_and_its_repeat_in_one_batch_are_learned_once(
        new_database_url, tmp_path, monkeypatch):
    """The buffer keeps a failed commit's time; a client's duplicate of the same event
    buffered behind it lands in the same drain batch. The commit did not land: the first
    is a new row, the repeat a duplicate (it was taken for the new row's recovery)."""
    with app_client(new_database_url(), tmp_path, feedback_buffer_size=0) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        a = written_decision(client, tenant, seed=0)["decision_id"]
        before = quality_count(client)
        commit_in_doubt(client, monkeypatch, tenant, a, "x", landed=False)
        sink = routing(client).sink
        t = routing(client).tenants[tenant["X-Tenant"]]
        (_, u), = sink._uncertain.items()
        out = {"quality": 0.5, "cost_usd": None, "latency_ms": None}
        res = sink.store_many([Incoming(t, a, "x", out, u.received),   # the buffer's retry
                               Incoming(t, a, "x", out, m.utcnow())])  # a later duplicate
        assert [r.status for r in res] == ["applied", "duplicate"]
        assert quality_count(client) == before + 1


def test_a_guarded_commit_in_doubt_recovered_or_settled_teaches_its_guard_once(
        new_database_url, tmp_path, monkeypatch):
    """A guarded tenant's feedback whose commit landed and whose answer was lost: the row
    recovered by the client's retry, and the row settled by a later batch, each teach the
    guard their lesson once, so the live account equals the one rebuilt from the stored
    decisions (the account without the fault). Before, both were applied without it."""
    with app_client(new_database_url(), tmp_path, feedback_buffer_size=0) as client:
        add_model(client, "guarded-a", 1.0, 2.0)
        add_model(client, "guarded-b", 0.1, 0.2)
        tenant = create_tenant(client)
        r = client.put("/v1/admin/tenants/" + tenant["X-Tenant"] + "/preferences",
                       json={"baseline_model": "guarded-a", "max_exploration_loss": 0.05},
                       headers=ADMIN)
        assert r.status_code == 200, r.text
        ds = [written_decision(client, tenant, seed=i)["decision_id"] for i in range(4)]
        service = routing(client)
        state = service.tenants[tenant["X-Tenant"]]
        assert state.guard_state.rounds == 4
        for d, event in ((ds[0], "retried"), (ds[1], "settled")):
            commit_in_doubt(client, monkeypatch, tenant, d, event, quality=0.4)
        # The client's retry recovers its row; the later feedback settles the other.
        assert send(client, tenant, ds[0], "retried", quality=0.4).json()["status"] == "applied"
        assert send(client, tenant, ds[2], "later", quality=0.9).json()["status"] == "applied"
        assert not service.sink._uncertain
        live = state.guard_state.to_dict()
        assert live["value_rounds"] == 3
        service.guards.rebuild(state)
        assert state.guard_state.to_dict() == pytest.approx(live)


def test_a_commit_made_visible_after_the_next_batch_read_is_still_settled(
        new_database_url, tmp_path, monkeypatch):
    """PostgreSQL may make a COMMIT whose connection died visible after the next batch's
    read: a commit in doubt not found stored stays in doubt (IN_DOUBT_S) and a later batch
    that finds it applies it. Was: dropped at the first read, the row then stored and never
    learned (a later row's id passed it). Simulated: the commit does not land; the row
    appears afterwards (inserted as the lost COMMIT would have)."""
    with app_client(new_database_url(), tmp_path, feedback_buffer_size=0) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        a, b, c = (written_decision(client, tenant, seed=i)["decision_id"] for i in range(3))
        before = quality_count(client)
        commit_in_doubt(client, monkeypatch, tenant, a, "x", landed=False)
        sink = routing(client).sink
        assert send(client, tenant, b, "later", quality=0.7).json()["status"] == "applied"
        (key, u), = sink._uncertain.items()  # not found: still in doubt
        with sink.engine.begin() as conn:  # the lost COMMIT, visible only now
            conn.execute(m.Feedback.__table__.insert(),
                         Incoming(u.tenant, a, "x", {"quality": 0.5}, u.received).row())
        assert send(client, tenant, c, "later", quality=0.7).json()["status"] == "applied"
        assert not sink._uncertain and key in sink._settled
        assert quality_count(client) == before + 3  # a's row learned, once
        assert send(client, tenant, a, "x", quality=0.5).json()["status"] == "applied"
        assert quality_count(client) == before + 3


def test_a_commit_in_doubt_not_found_for_in_doubt_s_is_taken_as_not_landed(monkeypatch):
    tenant = SimpleNamespace(id="t")
    now = m.utcnow()
    recent = Uncertain(0.0, 0.0, now, tenant)
    old = Uncertain(0.0, 0.0, now - timedelta(seconds=ingest_rows.IN_DOUBT_S + 1), tenant)
    uncertain = {("t", "recent", "e"): recent, ("t", "old", "e"): old}
    items = [Incoming(tenant, d, "e", IN_DOUBT, u.received)
             for d, u in (("recent", recent), ("old", old))]
    settled(uncertain, {}, items, [])  # type: ignore[arg-type]
    assert list(uncertain) == [("t", "recent", "e")]
