"""The router's own outcomes are stored in batches (one transaction per batch), none lost
at shutdown and none stored twice; on SQLite and on the real PostgreSQL of ``ops/``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import event

from bandit import InvalidInputError
from service.app import create_app
from service.exceptions import NotFoundError
from service.gateway.feedback import BATCH_TARGET, EVENT_ID, FeedbackSender
from service.routing import FeedbackItem, FeedbackReceipt, RoutingService, TenantState
from tests.fakes.openai_upstream import running_upstream
from tests.gateway.conftest import KEY_ENV, UPSTREAM_KEY
from tests.service.conftest import ADMIN, add_model, create_tenant, decide, make_settings
from tests.service.live import live_server


def test_feedback_many_one_transaction_and_a_result_per_item(
        new_database_url: Callable[[], str]) -> None:
    with TestClient(create_app(make_settings(new_database_url()))) as client:
        service, tenant, headers, ids = _decided(client, 5)
        commits: list[int] = []

        def count(_conn: object) -> None:
            commits.append(1)

        event.listen(service.engine, "commit", count)
        outcome = {"quality": None, "cost_usd": 0.001, "latency_ms": 12.0}
        items = [FeedbackItem(tenant, d, outcome, EVENT_ID) for d in ids]
        results = service.feedback_many([
            *items,
            FeedbackItem(tenant, ids[0], outcome, EVENT_ID),  # repeated in the batch
            FeedbackItem(tenant, "no-such-decision", outcome, EVENT_ID),
            FeedbackItem(tenant, ids[1], {**outcome, "cost_usd": -1.0}, "other")])
        event.remove(service.engine, "commit", count)
        assert len(commits) == 1  # the five outcomes in one transaction
        assert [r.status for r in results[:6]] == ["applied"] * 5 + ["duplicate"]  # type: ignore[union-attr]
        assert isinstance(results[6], NotFoundError)
        assert isinstance(results[7], InvalidInputError) and results[7].field == "cost_usd"
        # Again: every one is a duplicate, nothing is stored or learned twice.
        applied = service.last_feedback_id
        again = service.feedback_many(items)
        assert all(isinstance(r, FeedbackReceipt) and r.status == "duplicate"
                   for r in again), again
        assert service.last_feedback_id == applied
        for d in ids:
            r = client.get(f"/v1/decisions/{d}", headers=headers)
            assert [f["cost_usd"] for f in r.json()["feedback"]] == [0.001]


def test_outcomes_queued_at_shutdown_are_stored_once(
        new_database_url: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    # A slow decision writer: the outcomes wait (twice its interval) in the gateway's
    # queue, and are still there when the service is told to stop.
    settings = make_settings(new_database_url(), featurizer="hashing",
                             decision_flush_interval_s=2.0)
    apps: list[FastAPI] = []
    n = 12
    with running_upstream() as upstream:
        with live_server(settings, prepare=apps.append) as base:
            with httpx.Client(base_url=base, timeout=30) as http:
                model = add_model(http, base_url=f"{upstream.base_url}/v1",  # type: ignore[arg-type]
                                  api_key_env=KEY_ENV)
                upstream.set(model)
                r = http.post("/v1/admin/tenants", json={"name": "shutdown"}, headers=ADMIN)
                key = r.json()["api_key"]
            auth = {"Authorization": f"Bearer {key}"}

            async def chats() -> list[str]:
                async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                    answers = await asyncio.gather(*(client.post(
                        "/v1/chat/completions", headers=auth, json={
                            "model": "auto", "stream": i % 2 == 1,
                            "messages": [{"role": "user", "content": f"question {i}"}]})
                        for i in range(n)))
                assert all(a.status_code == 200 for a in answers), answers
                return [a.headers["x-router-decision-id"] for a in answers]

            ids = asyncio.run(chats())
            # They are acknowledged and not stored yet: the shutdown must store them.
            assert apps[0].state.gateway.feedback.queued() > 0
        with live_server(settings) as base, httpx.Client(base_url=base, timeout=30) as http:
            for d in ids:
                r = http.get(f"/v1/decisions/{d}", headers=auth)
                assert r.status_code == 200, r.text
                assert [f["event_id"] for f in r.json()["feedback"]] == [EVENT_ID], d


def _decided(client: TestClient, n: int, models: int = 1
             ) -> tuple[RoutingService, TenantState, dict[str, str], list[str]]:
    """The app's routing service, a new tenant (and its headers) and the ids of its ``n``
    decisions over ``models`` new models, stored."""
    service: RoutingService = client.app.state.routing  # type: ignore[attr-defined]
    names = [add_model(client) for _ in range(models)]
    headers = create_tenant(client)
    ids = [decide(client, headers, names, seed=i).json()["decision_id"] for i in range(n)]
    assert service.writer.flush()
    return service, service.tenants[headers["X-Tenant"]], headers, ids


async def _until_stored(sender: FeedbackSender, within_s: float) -> float:
    started = time.perf_counter()
    while sender.queued() and time.perf_counter() - started < within_s:
        await asyncio.sleep(0.01)
    return time.perf_counter() - started


def test_store_outcomes_batch_sent_when_target_is_queued_not_after_max_wait(
        new_database_url: Callable[[], str]) -> None:
    with TestClient(create_app(make_settings(new_database_url()))) as client:
        service, tenant, headers, ids = _decided(client, BATCH_TARGET + 3)
        commits: list[int] = []
        event.listen(service.engine, "commit", lambda _conn: commits.append(1))

        async def run() -> tuple[int, int]:
            # A max wait far beyond the test's patience: only the target sends the batch.
            sender = FeedbackSender(service, max_wait_s=600.0)
            sender.start()
            for d in ids[:BATCH_TARGET]:
                sender.report(tenant, d, quality=None, cost_usd=1e-4, latency_ms=3.0)
            await _until_stored(sender, 20.0)
            left = sender.queued()
            # Fewer than the target: they wait (and the shutdown stores them).
            for d in ids[BATCH_TARGET:]:
                sender.report(tenant, d, quality=None, cost_usd=1e-4, latency_ms=3.0)
            await asyncio.sleep(0.3)
            waiting = sender.queued()
            await sender.aclose()
            return left, waiting

        left, waiting = asyncio.run(run())
        assert (left, waiting) == (0, 3)
        assert len(commits) == 2  # the full batch, then the 3 stored at shutdown
        for d in ids:
            r = client.get(f"/v1/decisions/{d}", headers=headers)
            assert [f["event_id"] for f in r.json()["feedback"]] == [EVENT_ID], d


def test_store_outcomes_fewer_than_target_sent_after_max_wait(
        new_database_url: Callable[[], str]) -> None:
    with TestClient(create_app(make_settings(new_database_url()))) as client:
        service, tenant, headers, ids = _decided(client, 3)

        async def run() -> tuple[int, int]:
            sender = FeedbackSender(service, max_wait_s=0.5)
            sender.start()
            for d in ids:
                sender.report(tenant, d, quality=None, cost_usd=1e-4, latency_ms=3.0)
            await asyncio.sleep(0.1)
            waiting = sender.queued()  # for more, up to max_wait_s
            await _until_stored(sender, 20.0)
            left = sender.queued()
            await sender.aclose()
            return waiting, left

        assert asyncio.run(run()) == (3, 0)
        for d in ids:
            r = client.get(f"/v1/decisions/{d}", headers=headers)
            assert [f["cost_usd"] for f in r.json()["feedback"]] == [1e-4], d


def test_feedback_many_stores_a_batch_in_a_few_statements(
        new_database_url: Callable[[], str]) -> None:
    """A batch of outcomes is a few statements, not one per row (the ORM's unit of work
    updated each decision's charge on its own: CPU the storing thread takes from the
    requests, GIL held); the rows are those stored one by one."""
    with TestClient(create_app(make_settings(new_database_url()))) as client:
        n = 40
        service, tenant, headers, ids = _decided(client, n)
        statements: list[str] = []

        def count(_conn: object, _cursor: object, statement: str, *_: object) -> None:
            statements.append(statement.split(None, 1)[0].upper())

        event.listen(service.engine, "before_cursor_execute", count)
        items = [FeedbackItem(tenant, d, {"quality": None, "cost_usd": 0.001 * (i + 1),
                                          "latency_ms": 12.0}, EVENT_ID)
                 for i, d in enumerate(ids)]
        # A second event of the first decision in the same batch: its charge is the
        # later cost, the ledger adjusted by the difference.
        items.append(FeedbackItem(tenant, ids[0], {"cost_usd": 0.5}, "client"))
        results = service.feedback_many(items)
        event.remove(service.engine, "before_cursor_execute", count)
        assert all(isinstance(r, FeedbackReceipt) and r.status == "applied"
                   for r in results), results
        data = [s for s in statements if s in {"SELECT", "INSERT", "UPDATE"}]
        assert len(data) <= 5, statements  # decisions, feedback, insert, charges
        ids_stored = [r.feedback_id for r in results]  # type: ignore[union-attr]
        assert ids_stored == sorted(ids_stored) and len(set(ids_stored)) == n + 1
        for i, d in enumerate(ids):
            body = client.get(f"/v1/decisions/{d}", headers=headers).json()
            want = [0.001 * (i + 1), 0.5] if i == 0 else [0.001 * (i + 1)]
            assert [f["cost_usd"] for f in body["feedback"]] == want
            assert body["charged_usd"] == want[-1]


def test_applying_a_batch_gives_the_event_loop_turns(
        new_database_url: Callable[[], str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread storing a batch pauses (a real sleep, so that a thread waiting for the
    GIL gets it) after every ``_YIELD_EVERY`` rows applied, not once at the end: the
    event loop waits for one chunk, not the whole batch (service/ingest.py)."""
    import threading

    import service.ingest as ingest

    with TestClient(create_app(make_settings(new_database_url()))) as client:
        service, tenant, _, ids = _decided(client, 25)
        me, pauses = threading.get_ident(), []
        real_sleep = time.sleep

        def sleep(seconds: float) -> None:
            if threading.get_ident() == me:
                pauses.append(seconds)
            real_sleep(seconds)

        monkeypatch.setattr(time, "sleep", sleep)
        results = service.feedback_many([FeedbackItem(
            tenant, d, {"cost_usd": 0.001, "latency_ms": 5.0}, EVENT_ID) for d in ids])
        monkeypatch.undo()
        assert all(isinstance(r, FeedbackReceipt) and r.status == "applied"
                   for r in results), results
        assert ingest._YIELD_EVERY == 10 and ingest._YIELD_S > 0
        assert pauses == [ingest._YIELD_S] * 2  # after rows 10 and 20 of 25


def test_a_batch_learns_what_its_stored_rows_learn_one_by_one(
        new_database_url: Callable[[], str]) -> None:
    """Each policy (every kind) after a batch of outcomes (successes, failures' 0, a
    client's quality, a duplicate, the same decision twice) holds the statistics of its
    state before the batch updated with the stored rows one by one in id order (what a
    restart's replay does), to 1e-9: the batch path stores what it learns, in order."""
    import numpy as np

    from bandit import Policy
    from bandit.stats import ArmStatistics
    from service.domain import price_estimate, stored_outcome, timestamp

    with TestClient(create_app(make_settings(new_database_url()))) as client:
        service, tenant, _, ids = _decided(client, 30, models=2)
        reference = {k: Policy.from_bytes(b) for k, b in service.policies.blobs().items()}
        first = service.last_feedback_id
        items = [FeedbackItem(tenant, d, {"quality": 0.0 if i % 4 == 0 else None,
                                          "cost_usd": 1e-4 * (i + 1),
                                          "latency_ms": 10.0 + i}, EVENT_ID)
                 for i, d in enumerate(ids)]
        items += [FeedbackItem(tenant, ids[1], {"quality": 0.8}, "client"),
                  FeedbackItem(tenant, ids[2], {"cost_usd": 0.5}, EVENT_ID),  # duplicate
                  FeedbackItem(tenant, ids[3], {"cost_usd": 2e-3, "quality": 0.4}, "c")]
        results = service.feedback_many(items)
        assert [getattr(r, "status", r) for r in results] == (
            ["applied"] * 31 + ["duplicate", "applied"])
        rows = service.history.feedback_rows(first, 1000)
        assert len(rows) == 32
        for fb, model, context, decided_at, predictions in rows:
            x = service.contexts.stored(context, fb.id)
            for policy in reference.values():
                policy.update(model, x, stored_outcome(fb), time=timestamp(decided_at),
                              cost_estimate=price_estimate(model, predictions))
        live = service.policies.all_policies()
        assert set(live) == set(reference)
        for key, policy in reference.items():
            for name in ArmStatistics.ARRAYS:
                want, got = getattr(policy._stats, name), getattr(live[key]._stats, name)
                if want is None:
                    assert got is None, (key, name)
                    continue
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-9,
                                           err_msg=f"{key} {name}")


def test_decisions_updated_in_the_order_of_their_ids() -> None:
    """Two processes storing feedback of the same decisions lock their rows in one order
    (the ORM's: by id) whatever order the decisions were read in, also across runs of
    different changed columns; otherwise PostgreSQL can deadlock them."""
    from datetime import UTC, datetime

    from service.ingest_rows import Decision, update_decisions

    decisions = []
    for n, changed in enumerate(["charge", "guard", "charge", "both", "none", "charge"]):
        d = Decision(f"d{n}", "t", "m", b"", None, 0.0, datetime.now(UTC), None)
        if changed in ("charge", "both"):
            d.charged_usd = 0.5
        if changed in ("guard", "both"):
            d.guard = {"n": 1}
        decisions.append(d)

    class Recorder:
        def __init__(self) -> None:
            self.ids: list[str] = []

        def execute(self, _statement: object, params: list[dict[str, object]]) -> None:
            self.ids.extend(str(p["b_id"]) for p in params)

    conn = Recorder()
    update_decisions(conn, reversed(decisions))  # type: ignore[arg-type]
    assert conn.ids == ["d0", "d1", "d2", "d3", "d5"]


def test_decisions_read_with_the_predictions_the_column_reads(
        new_database_url: Callable[[], str]) -> None:
    """Storing feedback reads its decisions' predictions (orjson, service.ingest_rows)
    as the JSON column itself reads them, also a row written by the standard library's
    json.dumps with NaN and infinities (SQLite: PostgreSQL refuses them)."""
    import json

    from sqlalchemy import select, text

    from service.db import models as m
    from service.ingest_rows import Decision

    with TestClient(create_app(make_settings(new_database_url()))) as client:
        service, _tenant, _, ids = _decided(client, 4, models=2)
        t = m.DecisionRow.__table__
        with service.engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                odd = {"m": {"quality": float("nan"), "score": -float("inf"),
                             "price_usd": 1e-5, "cost_usd": 0.1 + 0.2}}
                conn.execute(text("UPDATE decisions SET predictions = :p WHERE id = :i"),
                             {"p": json.dumps(odd), "i": ids[0]})
        with service.engine.connect() as conn:
            want = dict(conn.execute(select(t.c.id, t.c.predictions).where(
                t.c.id.in_(ids))).all())
            got = Decision.load(conn, ids)
        assert set(got) == set(ids)
        # repr: NaN equal to NaN, and every float to the bit.
        assert {i: repr(d.predictions) for i, d in got.items()} == {
            i: repr(p) for i, p in want.items()}
        assert len(got[ids[1]].predictions) == 2  # both models' predictions
        if service.engine.dialect.name == "sqlite":
            assert "nan" in repr(got[ids[0]].predictions)  # the odd row was read
