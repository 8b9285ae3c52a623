"""The gateway's own failure rows (service/quality_defaults.py): recorded when the
failure's outcome is drained if the database was away, told from a client gateway's
when written before the upgrade, never left ``pending`` over a client's default; and
the router's event ids refused from clients. SQLite and PostgreSQL (the ``live``
service of tests/gateway/conftest.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db import models as m
from service.gateway.feedback import FeedbackSender
from service.quality_defaults import DEFAULT_EVENT, OUTCOME_EVENT, Recorded
from service.routing import TenantState
from service.spool import SpooledFeedback
from tests.fakes.openai_upstream import FakeModel
from tests.gateway.conftest import Live
from tests.gateway.test_quality_default import _decide, _post, _row, _rows, _tenant
from tests.gateway.test_quality_default_rows import OUTCOME, _drain_refused, _pre_upgrade


def _call(live: Live, name: str) -> tuple[str, dict[str, str], TenantState, str]:
    """A decision of a tenant with defaults (made without the gateway: no outcome of
    the router's yet; a wait no default ends here): its key, auth, tenant and id."""
    key, auth = _tenant(live.router, quality_wait_seconds=3600)
    tenant, decision_id = _decide(live, key, live.router.add_model(answer=FakeModel(name)))
    assert live.app.state.routing.writer.flush(timeout=5.0)
    return key, auth, tenant, decision_id


def _gateway_item(tenant_id: str, decision_id: str) -> SpooledFeedback:
    """The gateway's failure outcome as the outage buffer keeps it."""
    return SpooledFeedback(1, tenant_id, decision_id, OUTCOME_EVENT, dict(OUTCOME),
                           m.utcnow().isoformat())


def test_drained_gateway_outcome_marks_its_pre_upgrade_row(live: Live) -> None:
    """A gateway failure's row written before the upgrade (event id NULL) whose outcome
    was still buffered at the upgrade (migration 0014 left it unmarked): drained, the
    outcome marks the row the gateway's, and a client's buffered rating equal to the
    0 is then refused. Before, the rating took the row: the call's 0 learned twice."""
    key, _, tenant, decision_id = _call(live, "pre-upgrade buffered")
    live.app.state.gateway.defaults.record([Recorded(tenant.id, decision_id, 0.0, None)])
    _pre_upgrade(live, decision_id)
    live.app.state.routing.sink._drain_batch([_gateway_item(tenant.id, decision_id)])
    assert _row(live, decision_id).event_id == OUTCOME_EVENT
    assert live.app.state.gateway.defaults.drained(tenant.id, decision_id, "user",
                                                   OUTCOME) == {**OUTCOME, "quality": None}
    assert _rows(live.router, key, decision_id, 1)[OUTCOME_EVENT]["quality"] == 0.0


def test_pre_upgrade_row_of_a_stored_gateway_outcome_refuses_an_equal_rating(
        live: Live) -> None:
    """A gateway failure's row without an event id whose outcome is stored (an older
    replica's during a rolling upgrade, or stored by a lagging learner after 0014):
    neither a drained rating nor a client gateway's ``failed`` of the same quality
    takes it. Before, either did: the call's 0 learned twice."""
    router = live.router
    key, auth = _tenant(router)
    tenant, decision_id = _decide(live, key, router.add_model(answer=FakeModel("old")))
    FeedbackSender(live.app.state.routing)._post([(
        tenant, decision_id, dict(OUTCOME), Recorded(tenant.id, decision_id, 0.0, None))])
    _pre_upgrade(live, decision_id)
    assert live.app.state.routing.writer.flush(timeout=5.0)
    assert live.app.state.gateway.defaults.drained(tenant.id, decision_id, "user",
                                                   OUTCOME) == {**OUTCOME, "quality": None}
    r = _post(router, auth, decision_id, quality=0.0, failed=True, event_id="litellm-1")
    assert r.status_code == 409, r.text
    assert _row(live, decision_id).event_id is None


def test_gateway_failure_unrecorded_in_an_outage_is_recorded_when_drained(
        live: Live) -> None:
    """A gateway failure while the database was away: record() failed (no row), the
    outcome was buffered. Drained, its final row is recorded: the client's retried
    rating is refused as for any failed call. Before, the rating was taken too: the
    call learned its 0 and the rating."""
    key, auth, tenant, decision_id = _call(live, "outage failure")
    live.app.state.routing.sink._drain_batch([_gateway_item(tenant.id, decision_id)])
    row = _row(live, decision_id)
    assert (row.state, row.quality, row.due_at, row.event_id) == (
        "final", 0.0, None, OUTCOME_EVENT)
    r = _post(live.router, auth, decision_id, quality=0.9, event_id="user")
    assert r.status_code == 409 and "the call failed" in r.json()["detail"], r.text
    assert _rows(live.router, key, decision_id, 1)[OUTCOME_EVENT]["quality"] == 0.0


def test_drained_gateway_failure_keeps_out_its_zero_when_rated_first(live: Live) -> None:
    """The client rated the call (its marker) before the gateway's buffered failure was
    drained: the failure's 0 is left out (its latency kept), as record() leaves it.
    Before, both were learned."""
    _, auth, tenant, decision_id = _call(live, "rated first")
    r = _post(live.router, auth, decision_id, quality=0.9, event_id="user")
    assert r.status_code == 202, r.text
    assert live.app.state.gateway.defaults.drained(
        tenant.id, decision_id, OUTCOME_EVENT, OUTCOME) == {**OUTCOME, "quality": None}
    assert (_row(live, decision_id).state, _row(live, decision_id).event_id) == (
        "replaced", "user")


@pytest.mark.parametrize("row", ["live", "pre-upgrade", "none"])
def test_drained_gateway_failure_refused_by_the_database_gives_its_row_back(
        live: Live, monkeypatch: pytest.MonkeyPatch, row: str) -> None:
    """The gateway's buffered failure refused by the database (dropped: its 0 never
    stored): its final row goes, and the client's rating is taken. ``row``: written
    live (record() before the outage), so before the upgrade (no event id; taken by
    the drain as the gateway's), or none (written by the drain). Before, a row written
    live or before the upgrade stayed: no quality ever learned, every rating refused."""
    key, auth, tenant, decision_id = _call(live, f"refused {row}")
    if row != "none":
        live.app.state.gateway.defaults.record([Recorded(tenant.id, decision_id, 0.0,
                                                         None)])
    if row == "pre-upgrade":
        _pre_upgrade(live, decision_id)
    _drain_refused(live, monkeypatch, IntegrityError, _gateway_item(tenant.id, decision_id))
    with Session(live.app.state.routing.engine) as session:
        assert session.get(m.QualityDefault, decision_id) is None
    r = _post(live.router, auth, decision_id, quality=0.9, event_id="user")
    assert r.status_code == 202 and r.json()["status"] == "applied", r.text


def test_refused_batch_gives_back_the_default_a_drained_failure_took(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of two drained items the database refuses, the first the gateway's
    failure over a client gateway's waiting default (its record() failed in an outage):
    stored item by item, each refused, the default is waiting again. Before, the
    retry took the failure's row again (its own now) and its undo deleted the row:
    the call's default was lost."""
    _, auth, tenant, decision_id = _call(live, "refused batch")
    r = _post(live.router, auth, decision_id, default_quality=0.8)
    assert r.status_code == 202, r.text
    _, _, other, other_id = _call(live, "refused batch other")
    _drain_refused(live, monkeypatch, IntegrityError, _gateway_item(tenant.id, decision_id),
                   _gateway_item(other.id, other_id))
    row = _row(live, decision_id)
    assert (row.state, row.quality, row.event_id) == ("pending", 0.8, None)
    assert row.due_at is not None


@pytest.mark.parametrize("outcome", ["stored", "drained"])
def test_gateway_success_leaves_a_clients_pre_upgrade_failure_its_own(
        live: Live, outcome: str) -> None:
    """A client gateway's ``failed`` (recorded before the upgrade: no event id) for a
    call the router forwarded successfully: the router's outcome (no quality), stored
    or drained from the outage buffer, does not make the row the router's, and the
    client's retry is its duplicate. Before, the drain marked the row the router's and
    a stored success outcome kept the retry from adopting it: a 409."""
    key, auth, tenant, decision_id = _call(live, f"success then failed {outcome}")
    success = {"quality": None, "cost_usd": None, "latency_ms": 3.0}
    due = m.utcnow() + timedelta(hours=1)
    if outcome == "stored":
        FeedbackSender(live.app.state.routing)._post([(
            tenant, decision_id, dict(success), Recorded(tenant.id, decision_id, 0.7, due))])
    else:
        live.app.state.gateway.defaults.record([Recorded(tenant.id, decision_id, 0.7, due)])
    r = _post(live.router, auth, decision_id, quality=0.0, failed=True, event_id="lite-3")
    assert r.status_code == 202, r.text
    _pre_upgrade(live, decision_id)
    if outcome == "drained":
        live.app.state.routing.sink._drain_batch([SpooledFeedback(
            1, tenant.id, decision_id, OUTCOME_EVENT, dict(success),
            m.utcnow().isoformat())])
    assert _row(live, decision_id).event_id is None
    r = _post(live.router, auth, decision_id, quality=0.0, failed=True, event_id="lite-3")
    assert r.status_code == 202 and r.json()["status"] == "duplicate", r.text
    assert _row(live, decision_id).event_id == "lite-3"
    assert _rows(live.router, key, decision_id, 2)["lite-3"]["quality"] == 0.0


def test_gateway_failure_over_a_client_default_is_final(live: Live) -> None:
    """The router's failure recorded over a client gateway's waiting default (its
    ``default_quality``): the row is final, the gateway's, and a later rating is
    refused. Before, it stayed ``pending`` without a due time (never applied nor
    pruned) and a rating claimed it: the call's 0 and the rating both learned."""
    _, auth, tenant, decision_id = _call(live, "default then failure")
    r = _post(live.router, auth, decision_id, default_quality=0.8)
    assert r.status_code == 202, r.text
    defaults = live.app.state.gateway.defaults
    assert defaults.record([Recorded(tenant.id, decision_id, 0.0, None)]) == set()
    row = _row(live, decision_id)
    assert (row.state, row.quality, row.due_at, row.event_id) == (
        "final", 0.0, None, OUTCOME_EVENT)
    r = _post(live.router, auth, decision_id, quality=0.9, event_id="user")
    assert r.status_code == 409 and "the call failed" in r.json()["detail"], r.text


@pytest.mark.parametrize("event", [OUTCOME_EVENT, DEFAULT_EVENT])
def test_feedback_refuses_the_routers_event_ids(live: Live, event: str) -> None:
    """A client's feedback with the router's own event id would be taken for the
    router's (no claim, no check): 422 naming ``event_id`` and the reserved ids,
    nothing stored, and the service keeps answering."""
    key, auth, _, decision_id = _call(live, f"reserved {event}")
    r = _post(live.router, auth, decision_id, quality=0.9, event_id=event)
    assert r.status_code == 422, r.text
    error = r.json()["errors"][0]
    assert error["field"] == "event_id", r.text
    assert "gateway, gateway-default" in error["message"], r.text
    assert "gateway-default" in error["allowed"], r.text
    r = live.router.http.get(f"/v1/decisions/{decision_id}",
                             headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200 and r.json()["feedback"] == [], r.text
    with Session(live.app.state.routing.engine) as session:
        assert session.get(m.QualityDefault, decision_id) is None
    r = _post(live.router, auth, decision_id, quality=0.9, event_id="user")
    assert r.status_code == 202 and r.json()["status"] == "applied", r.text
