"""A drain's batch of buffered feedback taken together (``QualityDefaults.
take_drained_many``, service/ingest.py ``_drain_batch``): the qualities of tenants
without defaults are looked up in one query for the batch, and still answer as the
item-by-item steps do when a row of the tenant's exists or another item of the batch
writes one. SQLite and PostgreSQL (the ``live`` service of tests/gateway/conftest.py)."""

from __future__ import annotations

import threading

from sqlalchemy import event

from service.db import models as m
from service.quality_defaults import OUTCOME_EVENT, Recorded
from service.spool import SpooledFeedback
from tests.fakes.openai_upstream import FakeModel
from tests.gateway.conftest import Live
from tests.gateway.test_quality_default import _decide, _row, _rows
from tests.gateway.test_quality_default_rows import OUTCOME

RATING = {"quality": 0.9, "cost_usd": None, "latency_ms": None}


def _item(seq: int, tenant_id: str, decision_id: str, event: str,
          outcome: dict[str, float | None]) -> SpooledFeedback:
    return SpooledFeedback(seq, tenant_id, decision_id, event, dict(outcome),
                           m.utcnow().isoformat())


def _plain_call(live: Live, name: str) -> tuple[str, str, str]:
    """A decision of a tenant without defaults (no gateway settings): key, tenant, id."""
    key = live.router.tenant()
    tenant, decision_id = _decide(live, key, live.router.add_model(answer=FakeModel(name)))
    assert live.app.state.routing.writer.flush(timeout=5.0)
    return key, tenant.id, decision_id


def test_batch_rating_after_a_drained_gateway_failure_of_the_same_call_is_refused(
        live: Live) -> None:
    """One batch: the gateway's failure of a call (its record() failed in the outage)
    and then the client's rating of that call, a tenant without defaults. The failure
    writes the call's final row; the rating must see it (a second quality: dropped),
    as it does item by item. Looked up with the batch before the failure's row was
    written, the rating was taken too: the call learned its 0 and the rating."""
    key, tenant_id, decision_id = _plain_call(live, "batch failure then rating")
    live.app.state.routing.sink._drain_batch([
        _item(1, tenant_id, decision_id, OUTCOME_EVENT, OUTCOME),
        _item(2, tenant_id, decision_id, "user", RATING)])
    assert (_row(live, decision_id).state, _row(live, decision_id).event_id) == (
        "final", OUTCOME_EVENT)
    stored = _rows(live.router, key, decision_id, 1)
    assert set(stored) == {OUTCOME_EVENT} and stored[OUTCOME_EVENT]["quality"] == 0.0


def test_batch_rating_of_a_recorded_failure_is_refused_without_defaults(
        live: Live) -> None:
    """A tenant without defaults whose call has a row of its own (the gateway recorded
    the call's failure): a drained rating of it in a batch with another tenant's
    rating is refused (dropped), the other stored. Taken as "no defaults, nothing to
    claim" without the lookup, the rating was learned with the failure's 0."""
    key, tenant_id, decision_id = _plain_call(live, "batch recorded failure")
    other_key, other_id, other_decision = _plain_call(live, "batch other tenant")
    live.app.state.gateway.defaults.record([Recorded(tenant_id, decision_id, 0.0, None)])
    live.app.state.routing.sink._drain_batch([
        _item(1, other_id, other_decision, "user", RATING),
        _item(2, tenant_id, decision_id, "user", RATING)])
    assert _rows(live.router, other_key, other_decision, 1)["user"]["quality"] == 0.9
    assert _rows(live.router, key, decision_id, 0) == {}
    assert _row(live, decision_id).state == "final"


def test_batch_ratings_after_success_outcomes_are_looked_up_together(live: Live) -> None:
    """Tenants without defaults, each call's success outcome (the gateway's, no quality)
    buffered before the client's rating: the batch's ratings are looked up with one
    statement on the table, not taken item by item (three statements each). Before,
    the success outcome sent its call's rating one by one: a gateway tenant's drain
    stayed as slow as the one that never emptied under load."""
    calls = [_plain_call(live, f"batch success {n}") for n in range(3)]
    items = [item for n, (_, tenant_id, decision_id) in enumerate(calls) for item in (
        _item(2 * n, tenant_id, decision_id, OUTCOME_EVENT,
              {"quality": None, "cost_usd": 0.001, "latency_ms": 3.0}),
        _item(2 * n + 1, tenant_id, decision_id, "user", RATING))]
    engine, mine = live.app.state.routing.engine, threading.get_ident()
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:  # noqa: ANN001
        if threading.get_ident() == mine and "quality_defaults" in statement:
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        taken = live.app.state.gateway.defaults.take_drained_many(items)
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert taken == [(item.outcome, None) for item in items]
    assert len(statements) == 1, statements
