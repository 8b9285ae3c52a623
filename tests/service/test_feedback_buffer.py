"""Feedback while the database is unreachable (issue 7): kept in the bounded on-disk
buffer (``service/spool.py``), answered 202 ``buffered``, stored and applied through the
same path as direct feedback once the database is back.

The outage is simulated in-process (SQLite and PostgreSQL): every statement on the app's
engine fails with ``OperationalError`` while :func:`database_down` is active, exactly
what SQLAlchemy raises for a refused connection. ``kill -9`` during an outage runs a real
``bandit-router serve`` on PostgreSQL behind a TCP proxy that the test cuts.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine, Insert, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from bandit import Policy
from service.app import create_app
from service.db import models as m
from service.exceptions import UnavailableError
from service.policies import PolicyStore
from service.routing import RoutingService
from tests.service.conftest import (
    ADMIN,
    _postgres_factory,
    add_model,
    assert_problem,
    create_tenant,
    decide,
    embedding,
    make_settings,
)
from tests.service.test_kill import free_port, small_and_large, start

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- helpers
@contextmanager
def database_down(engine: Engine) -> Iterator[None]:
    """Every statement on ``engine`` fails as if the server refused the connection."""

    def refuse(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        raise OperationalError(statement, parameters,
                               ConnectionRefusedError("simulated database outage"))

    event.listen(engine, "before_cursor_execute", refuse)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", refuse)


@contextmanager
def app_client(url: str, tmp_path: Path, **overrides: object) -> Iterator[TestClient]:
    settings = make_settings(url, feedback_buffer_dir=tmp_path, **overrides)
    with TestClient(create_app(settings)) as client:
        yield client


def routing(client: TestClient) -> RoutingService:
    return client.app.state.routing  # type: ignore[attr-defined]


def written_decision(client: TestClient, tenant: dict[str, str], seed: int) -> dict[str, Any]:
    r = decide(client, tenant, seed=seed)
    assert r.status_code == 200, r.text
    assert routing(client).writer.flush(timeout=10)
    return r.json()


def wait_drained(client: TestClient, timeout: float = 20.0) -> None:
    service = routing(client)
    deadline = time.monotonic() + timeout
    while service.feedback_buffered():
        assert time.monotonic() < deadline, f"{service.feedback_buffered()} still buffered"
        time.sleep(0.05)


def policy_bytes(client: TestClient) -> dict[str, bytes]:
    service = routing(client)
    with service.policies.lock:
        return {k: p.to_bytes() for k, p in service.policies.all_policies().items()}


def quality_count(client: TestClient) -> int:
    """Quality observations in the shared LinUCB policy (each applied feedback adds one)."""
    policy = routing(client).shared["linucb"]
    return int(np.sum(policy._stats.count[:, 0]))


def feedback_rows(client: TestClient, decision_id: str) -> list[dict[str, Any]]:
    """The stored feedback rows of a decision, whoever sent them."""
    service = routing(client)
    with Session(service.engine) as session:
        rows = session.scalars(select(m.Feedback).where(m.Feedback.decision_id == decision_id)
                               .order_by(m.Feedback.id)).all()
        return [{"event_id": r.event_id, "tenant_id": r.tenant_id, "quality": r.quality,
                 "cost_usd": r.cost_usd} for r in rows]


def buffer_counter(client: TestClient, result: str) -> float:
    value = routing(client).metrics.registry.get_sample_value(
        "bandit_router_feedback_buffer_total", {"result": result})
    return value or 0.0


def send(client: TestClient, tenant: dict[str, str], decision_id: str, event: str | None,
         **outcome: float) -> httpx.Response:
    body: dict[str, Any] = {"decision_id": decision_id, **(outcome or {"quality": 0.8})}
    if event is not None:
        body["event_id"] = event
    return client.post("/v1/feedback", json=body, headers=tenant)


# ---------------------------------------------------------------------- tests
def test_outage_feedback_buffered_then_stored_and_applied_once(new_database_url, tmp_path):
    with app_client(new_database_url(), tmp_path) as client:
        add_model(client, "small", 0.2, 0.8)
        add_model(client, "large", 5.0, 20.0)
        tenant = create_tenant(client)
        service = routing(client)
        decisions = [written_decision(client, tenant, seed=i) for i in range(5)]
        before = quality_count(client)
        ledger = service.tenants[tenant["X-Tenant"]].ledger
        spend_before = ledger.snapshot()[0]
        with database_down(service.engine):
            answers = [send(client, tenant, d["decision_id"], f"ev-{i}", quality=0.6,
                            cost_usd=0.5) for i, d in enumerate(decisions)]
            assert [a.status_code for a in answers] == [202] * 5, answers[0].text
            assert [a.json()["status"] for a in answers] == ["buffered"] * 5
            assert answers[0].json() == {"status": "buffered",
                                         "decision_id": decisions[0]["decision_id"],
                                         "event_id": "ev-0"}
            # A repeat while buffered is a duplicate (the buffer's own unique key).
            again = send(client, tenant, decisions[0]["decision_id"], "ev-0", quality=0.6,
                         cost_usd=0.5)
            assert again.status_code == 202 and again.json()["status"] == "duplicate"
            assert service.feedback_buffered() == 5
            ready = client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "degraded"
            time.sleep(0.5)  # the drain retries meanwhile; nothing may be applied
            assert quality_count(client) == before
        wait_drained(client)
        # Every buffered feedback stored once and learned from once.
        for i, d in enumerate(decisions):
            rows = feedback_rows(client, d["decision_id"])
            assert rows == [{"event_id": f"ev-{i}", "tenant_id": tenant["X-Tenant"],
                             "quality": 0.6, "cost_usd": 0.5}], rows
        assert quality_count(client) == before + 5
        assert service.last_feedback_id >= 5
        # The charge is reconciled as for direct feedback: the decision's charged_usd and
        # the tenant's ledger.
        for d in decisions:
            got = client.get(f"/v1/decisions/{d['decision_id']}", headers=tenant).json()
            assert got["charged_usd"] == pytest.approx(0.5)
        predicted = sum(d["predictions"][d["model"]]["cost_usd"] for d in decisions)
        assert ledger.snapshot()[0] - spend_before == pytest.approx(5 * 0.5 - predicted)
        # A repeat after the drain hits the stored row: duplicate, nothing changes.
        again = send(client, tenant, decisions[1]["decision_id"], "ev-1", quality=0.6,
                     cost_usd=0.5)
        assert again.status_code == 202 and again.json()["status"] == "duplicate"
        assert quality_count(client) == before + 5
        assert buffer_counter(client, "buffered") == 5
        assert buffer_counter(client, "drained") == 5
        assert buffer_counter(client, "dropped") == 0
        assert client.get("/readyz").json()["status"] == "ready"
        # The status is part of the documented contract.
        schema = client.get("/openapi.json").json()["components"]["schemas"]
        assert "buffered" in schema["FeedbackResponse"]["properties"]["status"]["enum"]
    # A clean stop with an empty buffer leaves no file behind.
    assert not list(tmp_path.glob("feedback-buffer-*"))


def test_buffer_full_is_503_with_retry_after(new_database_url, tmp_path):
    with app_client(new_database_url(), tmp_path, feedback_buffer_size=2) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        service = routing(client)
        decisions = [written_decision(client, tenant, seed=i)["decision_id"]
                     for i in range(3)]
        before = quality_count(client)
        with database_down(service.engine):
            assert send(client, tenant, decisions[0], "a").json()["status"] == "buffered"
            assert send(client, tenant, decisions[1], "a").json()["status"] == "buffered"
            full = send(client, tenant, decisions[2], "a")
            body = assert_problem(full, 503)
            assert int(full.headers["Retry-After"]) >= 1
            assert "buffer is full" in body["detail"]
            assert service.feedback_buffered() == 2
            assert buffer_counter(client, "full") == 1
            # A repeat of buffered feedback is still a duplicate while the buffer is full.
            again = send(client, tenant, decisions[0], "a")
            assert again.status_code == 202 and again.json()["status"] == "duplicate"
            assert buffer_counter(client, "full") == 1
        wait_drained(client)
        assert quality_count(client) == before + 2
        assert feedback_rows(client, decisions[2]) == []  # refused: not stored
        # The caller's retry, as Retry-After says, is accepted.
        retry = send(client, tenant, decisions[2], "a")
        assert retry.status_code == 202 and retry.json()["status"] == "applied"
        assert quality_count(client) == before + 3


def test_forged_and_unknown_feedback_dropped_at_drain(new_database_url, tmp_path):
    with app_client(new_database_url(), tmp_path) as client:
        add_model(client, "small", 0.2, 0.8)
        add_model(client, "large", 5.0, 20.0)
        owner, forger = create_tenant(client, "owner"), create_tenant(client, "forger")
        service = routing(client)
        d = written_decision(client, owner, seed=1)
        snapshot = policy_bytes(client)
        versions = service.policies.versions()
        charged = client.get(f"/v1/decisions/{d['decision_id']}", headers=owner).json()
        owner_spend = service.tenants[owner["X-Tenant"]].ledger.snapshot()
        forger_spend = service.tenants[forger["X-Tenant"]].ledger.snapshot()
        with database_down(service.engine):
            # Another tenant's decision, with a cost meant to skew the budget.
            for event in ("e1", None):
                r = send(client, forger, d["decision_id"], event, quality=0.0, cost_usd=123.0)
                assert r.status_code == 202 and r.json()["status"] == "buffered"
            # A decision that does not exist.
            r = send(client, owner, str(uuid.uuid4()), "e1", quality=1.0)
            assert r.json()["status"] == "buffered"
        wait_drained(client)
        assert buffer_counter(client, "dropped") == 3
        assert buffer_counter(client, "drained") == 0
        # Nothing stored, no statistic, no charge, no ledger changed.
        assert feedback_rows(client, d["decision_id"]) == []
        assert policy_bytes(client) == snapshot
        assert service.policies.versions() == versions
        assert client.get(f"/v1/decisions/{d['decision_id']}",
                          headers=owner).json() == charged
        assert service.tenants[owner["X-Tenant"]].ledger.snapshot() == owner_spend
        assert service.tenants[forger["X-Tenant"]].ledger.snapshot() == forger_spend

        # The owner's feedback under the same event id as a forged one buffered before it
        # is not shadowed by it: the forged one is dropped, the owner's applied.
        before = quality_count(client)
        with database_down(service.engine):
            forged = send(client, forger, d["decision_id"], "e2", quality=0.0, cost_usd=99.0)
            real = send(client, owner, d["decision_id"], "e2", quality=0.9, cost_usd=0.01)
            assert forged.json()["status"] == real.json()["status"] == "buffered"
        wait_drained(client)
        assert feedback_rows(client, d["decision_id"]) == [
            {"event_id": "e2", "tenant_id": owner["X-Tenant"], "quality": 0.9,
             "cost_usd": 0.01}]
        assert quality_count(client) == before + 1
        assert buffer_counter(client, "dropped") == 4


def test_feedback_waits_for_its_decision_in_the_writer_queue(new_database_url, tmp_path):
    with app_client(new_database_url(), tmp_path) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        service = routing(client)
        written_decision(client, tenant, seed=0)
        before = quality_count(client)
        with database_down(service.engine):
            # Served from memory; the writer keeps the row and retries.
            r = decide(client, tenant, seed=5)
            assert r.status_code == 200
            decision = r.json()["decision_id"]
            assert service.writer.is_pending(decision)
            f = send(client, tenant, decision, "late", quality=0.4)
            assert f.status_code == 202 and f.json()["status"] == "buffered"
            time.sleep(0.3)
            assert service.feedback_buffered() == 1
        assert service.writer.flush(timeout=20)
        wait_drained(client)
        assert [r["event_id"] for r in feedback_rows(client, decision)] == ["late"]
        assert quality_count(client) == before + 1
        assert buffer_counter(client, "dropped") == 0


def test_readyz_degraded_while_the_buffer_holds_feedback(new_database_url, tmp_path):
    with app_client(new_database_url(), tmp_path) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        service = routing(client)
        d = written_decision(client, tenant, seed=0)
        service.sink.stop()  # hold the drain: the database is back first
        with database_down(service.engine):
            assert send(client, tenant, d["decision_id"], "r").json()["status"] == "buffered"
            during = client.get("/readyz")
            assert during.status_code == 200 and during.json()["status"] == "degraded"
            assert "feedback buffered (1 of 10000" in during.json()["serving"]
        # Database reachable, one feedback not stored yet: still degraded.
        after = client.get("/readyz")
        assert after.status_code == 200
        assert after.json()["status"] == "degraded"
        assert "1 feedback events" in after.json()["feedback_buffer"]
        metrics = client.get("/metrics", headers=ADMIN).text
        assert "bandit_router_feedback_buffer_depth 1.0" in metrics
        # New feedback queues behind the buffered one (order kept) even with the
        # database up.
        d2 = written_decision(client, tenant, seed=1)
        assert send(client, tenant, d2["decision_id"], "r").json()["status"] == "buffered"
        assert service.sink.drain(deadline=time.monotonic() + 10)
        assert client.get("/readyz").json() == {"status": "ready"}
        assert "bandit_router_feedback_buffer_depth 0.0" in client.get(
            "/metrics", headers=ADMIN).text
        assert [r["event_id"] for r in feedback_rows(client, d["decision_id"])] == ["r"]
        assert [r["event_id"] for r in feedback_rows(client, d2["decision_id"])] == ["r"]


def lose_the_answer_of_a_feedback_commit(monkeypatch: pytest.MonkeyPatch,
                                         meanwhile: Any = None) -> list[bool]:
    """The first commit of a feedback row reaches the database, then its connection dies
    before the answer (``meanwhile`` runs then); the list says it happened. (The ingest
    stores with Core statements on a Connection: its INSERT into ``feedback`` marks the
    connection, whose commit then loses its answer.)"""
    real_execute, real_commit = Connection.execute, Connection.commit
    lost: list[bool] = []

    def execute(self: Connection, statement: Any, *args: Any, **kwargs: Any) -> Any:
        result = real_execute(self, statement, *args, **kwargs)
        if isinstance(statement, Insert) and statement.table.name == "feedback":
            self.info["inserted-feedback"] = True  # (after it: a failed one stores nothing)
        return result

    def commit_then_lose_the_answer(self: Connection) -> None:
        real_commit(self)
        if self.info.pop("inserted-feedback", False) and not lost:
            lost.append(True)
            if meanwhile is not None:
                meanwhile()
            raise OperationalError("COMMIT", {}, ConnectionResetError("connection lost"))

    monkeypatch.setattr(Connection, "execute", execute)
    monkeypatch.setattr(Connection, "commit", commit_then_lose_the_answer)
    return lost


def test_commit_whose_outcome_was_lost_is_applied_once(new_database_url, tmp_path,
                                                       monkeypatch):
    """The commit reaches the database but the connection dies before its answer: the
    row is stored, the caller got ``buffered``; the drain must apply it (once), not take
    it for a duplicate."""
    with app_client(new_database_url(), tmp_path) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        service = routing(client)
        d = written_decision(client, tenant, seed=0)
        before = quality_count(client)
        ledger = service.tenants[tenant["X-Tenant"]].ledger
        spend_before = ledger.snapshot()[0]
        lost = lose_the_answer_of_a_feedback_commit(monkeypatch)
        r = send(client, tenant, d["decision_id"], "lost", quality=0.5, cost_usd=0.25)
        monkeypatch.undo()
        assert lost and r.status_code == 202 and r.json()["status"] == "buffered", r.text
        wait_drained(client)
        assert [f["event_id"] for f in feedback_rows(client, d["decision_id"])] == ["lost"]
        assert quality_count(client) == before + 1
        assert buffer_counter(client, "drained") == 1
        predicted = d["predictions"][d["model"]]["cost_usd"]
        assert ledger.snapshot()[0] - spend_before == pytest.approx(0.25 - predicted)


def test_full_buffer_after_a_commit_that_may_have_landed_is_not_unsent(
        new_database_url, tmp_path, monkeypatch):
    """The commit's answer was lost and the buffer filled meanwhile (another request):
    the 503 must not say ``unsent``, the row may be stored (a quality's claim is kept,
    service/routing.py). Before, every full-buffer 503 said ``unsent``."""
    with app_client(new_database_url(), tmp_path, feedback_buffer_size=1) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        service = routing(client)
        d, other = (written_decision(client, tenant, seed=i)["decision_id"] for i in (0, 1))

        def fill_the_buffer() -> None:
            assert service.sink.spool.add(tenant["X-Tenant"], other, "filler", {
                "quality": 0.1, "cost_usd": None, "latency_ms": None},
                m.utcnow().isoformat()) == "buffered"

        before = quality_count(client)
        lost = lose_the_answer_of_a_feedback_commit(monkeypatch, fill_the_buffer)
        with pytest.raises(UnavailableError, match="buffer is full") as refused:
            service.feedback(service.tenants[tenant["X-Tenant"]], d,
                             {"quality": 0.5, "cost_usd": None, "latency_ms": None}, "lost")
        monkeypatch.undo()
        assert lost and refused.value.unsent is False
        wait_drained(client)
        assert [f["event_id"] for f in feedback_rows(client, d)] == ["lost"]
        # The filler, and the stored row first: the drain's batch settles the commit in
        # doubt before it applies a later row (rel14: before, only the filler, and a
        # checkpoint then a restart lost the stored row for good).
        assert quality_count(client) == before + 2
        # The client retries the 503 (a new received time): the stored row was applied
        # once (before rel14 by this retry; before that, the retry took it for a
        # duplicate and nothing learned it); the retry answers ``applied``.
        assert send(client, tenant, d, "lost", quality=0.5).json()["status"] == "applied"
        assert [f["event_id"] for f in feedback_rows(client, d)] == ["lost"]
        assert quality_count(client) == before + 2
        assert send(client, tenant, d, "lost", quality=0.5).json()["status"] == "duplicate"
        assert quality_count(client) == before + 2


def test_without_a_buffer_the_retry_of_a_lost_commit_is_applied_once(
        new_database_url, tmp_path, monkeypatch):
    """No buffer: the commit's answer is lost, the client gets 503 and retries; the
    stored row is applied once, by the retry."""
    with app_client(new_database_url(), tmp_path, feedback_buffer_size=0) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        d = written_decision(client, tenant, seed=0)["decision_id"]
        before = quality_count(client)
        lost = lose_the_answer_of_a_feedback_commit(monkeypatch)
        r = send(client, tenant, d, "lost", quality=0.5)
        monkeypatch.undo()
        assert lost and r.status_code == 503, r.text
        assert quality_count(client) == before
        r = send(client, tenant, d, "lost", quality=0.5)
        assert r.json()["status"] == "applied", r.text
        assert [f["event_id"] for f in feedback_rows(client, d)] == ["lost"]
        assert quality_count(client) == before + 1
        assert send(client, tenant, d, "lost", quality=0.5).json()["status"] == "duplicate"
        assert quality_count(client) == before + 1


def test_lost_commit_then_later_feedback_then_restart_learns_every_stored_row(
        new_database_url, tmp_path, monkeypatch):
    """The commit's answer is lost (503: stored, not applied) and the client does not
    retry; a later feedback is applied and the shutdown checkpoints. Every stored row
    must be in the statistics, live and after the restart, once. Before (rel14), the
    later row moved ``last_feedback_id`` past the stored one: the checkpoint lacked it
    and the restart's replay started after it (lost for good; a retry a duplicate)."""
    url = new_database_url()
    with app_client(url, tmp_path, feedback_buffer_size=0) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        a, b = (written_decision(client, tenant, seed=i)["decision_id"] for i in (0, 1))
        before = quality_count(client)
        lost = lose_the_answer_of_a_feedback_commit(monkeypatch)
        r = send(client, tenant, a, "lost", quality=0.5)
        monkeypatch.undo()
        assert lost and r.status_code == 503, r.text
        assert send(client, tenant, b, "later", quality=0.7).json()["status"] == "applied"
        assert quality_count(client) == before + 2  # the stored row first, then the later
    with app_client(url, tmp_path, feedback_buffer_size=0) as client:
        assert quality_count(client) == before + 2
        assert send(client, tenant, a, "lost", quality=0.5).json()["status"] == "duplicate"
        assert quality_count(client) == before + 2


def test_retry_of_a_lost_commit_learns_the_stored_outcome(new_database_url, tmp_path,
                                                          monkeypatch):
    """The commit's answer is lost (first attempt: quality 0.1); the client's retry of
    the same event says 0.9. The row keeps the first attempt's outcome, so the policies
    must learn 0.1, what a replay of the rows learns. Before, the retry's body was
    learned: live statistics differed from a replay."""
    with app_client(new_database_url(), tmp_path, feedback_buffer_size=0) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        d = written_decision(client, tenant, seed=0)["decision_id"]
        lost = lose_the_answer_of_a_feedback_commit(monkeypatch)
        r = send(client, tenant, d, "lost", quality=0.1)
        monkeypatch.undo()
        assert lost and r.status_code == 503, r.text
        learned: list[dict[str, float | None]] = []
        real_apply = PolicyStore.apply

        def spy(self: PolicyStore, tenant_id: str, model: str, x: Any,
                outcome: dict[str, float | None], *args: Any) -> None:
            learned.append(outcome)
            real_apply(self, tenant_id, model, x, outcome, *args)

        monkeypatch.setattr(PolicyStore, "apply", spy)
        r = send(client, tenant, d, "lost", quality=0.9)
        assert r.json()["status"] == "applied", r.text
        rows = feedback_rows(client, d)
        assert [(f["event_id"], f["quality"]) for f in rows] == [("lost", 0.1)]
        assert [o["quality"] for o in learned] == [0.1]


def test_without_a_buffer_feedback_is_refused_with_503(new_database_url, tmp_path):
    with app_client(new_database_url(), tmp_path, feedback_buffer_size=0) as client:
        add_model(client, "small", 0.2, 0.8)
        tenant = create_tenant(client)
        service = routing(client)
        d = written_decision(client, tenant, seed=0)
        with database_down(service.engine):
            r = send(client, tenant, d["decision_id"], "x")
            assert_problem(r, 503)
            assert "Retry-After" in r.headers
        assert service.spool is None
        assert send(client, tenant, d["decision_id"], "x").json()["status"] == "applied"


# ------------------------------------------------------------- kill -9 (real server)
class CutProxy:
    """A TCP proxy to PostgreSQL that the test can cut: ``down()`` closes every open
    connection and refuses new ones (the service sees a server gone away)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = True
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._socks |= {client, server}
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def down(self) -> None:
        self.up = False
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.up = True

    def close(self) -> None:
        self.down()
        self.listener.close()


def _serve(url: str, port: int, buffer_dir: Path) -> subprocess.Popen:
    # /healthz, not /readyz: the database may be unreachable on purpose.
    return start(url, port, {"BANDIT_ROUTER_DATA_DIR": str(buffer_dir),
                             "BANDIT_ROUTER_FEEDBACK_BUFFER_DIR": str(buffer_dir)},
                 ready_path="/healthz")


@pytest.fixture
def postgres_database() -> Iterator[str]:
    with _postgres_factory() as new_database:
        yield new_database()


def test_kill_9_during_outage_then_restart_applies_buffered_feedback(postgres_database,
                                                                     tmp_path):
    target = make_url(postgres_database)
    proxy = CutProxy((target.host or "127.0.0.1", target.port or 5432))
    url = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    n = 12
    proc = _serve(url, port, tmp_path)
    try:
        with httpx.Client(base_url=base, timeout=20) as http:
            tenant = small_and_large(http, "k")
            decisions = []
            for i in range(n):
                r = http.post("/v1/decide", headers=tenant,
                              json={"query": {"embedding": embedding(i)}})
                assert r.status_code == 200
                decisions.append(r.json()["decision_id"])
            # Written before the outage (reading one forces the writer out).
            for d in decisions:
                assert http.get(f"/v1/decisions/{d}", headers=tenant).status_code == 200
            proxy.down()
            answers = [http.post("/v1/feedback", headers=tenant, json={
                "decision_id": d, "event_id": f"k-{i}", "quality": 0.3 + 0.05 * i,
                "cost_usd": 0.002}) for i, d in enumerate(decisions)]
            assert [a.status_code for a in answers] == [202] * n, answers[0].text
            assert {a.json()["status"] for a in answers} == {"buffered"}
            assert http.get("/readyz").json()["status"] == "degraded"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    spool_files = list(tmp_path.glob("feedback-buffer-*.sqlite3"))
    assert len(spool_files) == 1, spool_files

    # The database is back; a new process drains what the killed one acknowledged.
    proxy.restore()
    proc = _serve(url, port, tmp_path)
    try:
        with httpx.Client(base_url=base, timeout=20) as http:
            deadline = time.monotonic() + 30
            while True:
                stored = [len(http.get(f"/v1/decisions/{d}", headers=tenant)
                              .json()["feedback"]) for d in decisions]
                if stored == [1] * n:
                    break
                assert time.monotonic() < deadline, stored
                time.sleep(0.2)
            again = http.post("/v1/feedback", headers=tenant, json={
                "decision_id": decisions[0], "event_id": "k-0", "quality": 0.3,
                "cost_usd": 0.002})
            assert again.json()["status"] == "duplicate"
    finally:
        proc.terminate()
        proc.wait(30)
        proxy.close()
    assert not list(tmp_path.glob("feedback-buffer-*")), "the drained buffer file remains"

    # Stored exactly once, and the final checkpoint counts each exactly once.
    conninfo = target.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as conn:
        rows = conn.execute("SELECT decision_id::text, event_id, quality FROM feedback"
                            " ORDER BY id").fetchall()
        last, snapshot = conn.execute(
            "SELECT c.last_feedback_id, s.data FROM policy_checkpoints c JOIN "
            "policy_snapshots s ON s.checkpoint_id = c.id AND s.key = 'shared:linucb' "
            "ORDER BY c.id DESC LIMIT 1").fetchone()
        max_id = conn.execute("SELECT max(id) FROM feedback").fetchone()[0]
    assert sorted((d, e) for d, e, _ in rows) == sorted(
        (d, f"k-{i}") for i, d in enumerate(decisions))
    assert [q for _, _, q in rows] == pytest.approx([0.3 + 0.05 * i for i in range(n)])
    assert last == max_id
    counts = Policy.from_bytes(bytes(snapshot))._stats.count[:, 0]
    assert int(np.sum(counts)) == n
