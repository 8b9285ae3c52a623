"""What the gateway's ``quality_defaults`` rows keep (service/quality_defaults.py): a
failure's ``final`` row is never rewritten by the router's own default, one written
before the upgrade still takes its buffered failure's 0, and a drained quality the
database refuses gives its claim back. SQLite and PostgreSQL (the ``live`` service of
tests/gateway/conftest.py)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update
from sqlalchemy.exc import DataError, IntegrityError
from sqlalchemy.orm import Session

from service.db import models as m
from service.gateway.feedback import FeedbackSender
from service.quality_defaults import Recorded
from service.routing import TenantState
from service.spool import SpooledFeedback
from tests.fakes.openai_upstream import FakeModel
from tests.gateway.conftest import Live
from tests.gateway.test_quality_default import _decide, _post, _row, _rows, _tenant

OUTCOME = {"quality": 0.0, "cost_usd": None, "latency_ms": 3.0}


def _failed(live: Live, event: str) -> tuple[dict[str, str], TenantState, str]:
    """A decision of a tenant with defaults whose call a client gateway reports failed
    (``event``; "" for none): its auth header, the tenant and the decision."""
    key, auth = _tenant(live.router)
    tenant, decision_id = _decide(live, key, live.router.add_model(
        answer=FakeModel(f"failed {event}")))
    r = _post(live.router, auth, decision_id, quality=0.0, latency_ms=3.0, failed=True,
              **({"event_id": event} if event else {}))
    assert r.status_code == 202, r.text
    return auth, tenant, decision_id


def test_record_leaves_a_client_gateways_failure(live: Live) -> None:
    """The router's default for a success recorded over a client gateway's ``final``
    row (the LiteLLM plug-in's failure): the row keeps its 0 and no due time, record()
    says so (the router reports no quality for the call), and a rating's 409 names
    the failure. Before, the row took the default's 0.7 and due time (the 409 said the
    default was learned; an unsent refusal's unfinal then dropped the default too)."""
    auth, tenant, decision_id = _failed(live, "litellm-7")
    due = m.utcnow() + timedelta(hours=1)
    defaults = live.app.state.gateway.defaults
    assert defaults.record([Recorded(tenant.id, decision_id, 0.7, due)]) == {decision_id}
    row = _row(live, decision_id)
    assert (row.state, row.quality, row.due_at, row.event_id) == (
        "final", 0.0, None, "litellm-7")
    r = _post(live.router, auth, decision_id, quality=0.9, event_id="user")
    assert r.status_code == 409 and "the call failed" in r.json()["detail"], r.text


def _pre_upgrade(live: Live, decision_id: str) -> None:
    """The row as a service before this version wrote it: no event id."""
    with Session(live.app.state.routing.engine) as session, session.begin():
        session.execute(update(m.QualityDefault).where(
            m.QualityDefault.decision_id == decision_id).values(event_id=None))


@pytest.mark.parametrize("event", ["litellm-8", ""])
def test_pre_upgrade_failure_row_takes_its_buffered_zero(live: Live, event: str) -> None:
    """A client gateway's failure recorded ``final`` before the upgrade (event id NULL)
    whose feedback was buffered: drained after it, its 0 is stored (the row takes its
    event); another event's quality is then refused. Before, the drain took the 0 for
    a second quality and stripped it: the failure was never learned."""
    auth, tenant, decision_id = _failed(live, event)
    _pre_upgrade(live, decision_id)
    assert live.app.state.routing.writer.flush(timeout=5.0)
    defaults = live.app.state.gateway.defaults
    assert defaults.drained(tenant.id, decision_id, event, OUTCOME) == OUTCOME
    assert _row(live, decision_id).event_id == event
    assert defaults.drained(tenant.id, decision_id, "user", OUTCOME) == {
        **OUTCOME, "quality": None}
    assert defaults.drained(tenant.id, decision_id, event, OUTCOME) == OUTCOME
    # The plug-in's retry of the same failure is its duplicate, not a 409.
    r = _post(live.router, auth, decision_id, quality=0.0, latency_ms=3.0, failed=True,
              **({"event_id": event} if event else {}))
    assert r.status_code == 202 and r.json()["status"] == "duplicate", r.text


def test_pre_upgrade_failure_row_takes_its_retry(live: Live) -> None:
    """A client gateway's failure recorded before the upgrade (event id NULL), retried
    after it (the same ``failed`` report): the retry's duplicate, the row takes its
    event, and another failure is refused. Before, the retry was a 409."""
    auth, _, decision_id = _failed(live, "litellm-9")
    _pre_upgrade(live, decision_id)
    failure = {"quality": 0.0, "latency_ms": 3.0, "failed": True, "event_id": "litellm-9"}
    r = _post(live.router, auth, decision_id, **failure)
    assert r.status_code == 202 and r.json()["status"] == "duplicate", r.text
    assert _row(live, decision_id).event_id == "litellm-9"
    r = _post(live.router, auth, decision_id, **{**failure, "event_id": "litellm-10"})
    assert r.status_code == 409, r.text


def test_gateways_own_failure_row_refuses_a_buffered_rating(live: Live) -> None:
    """The gateway's own failure's row names its outcome's event ("gateway"): a client's
    rating drained from the buffer, even one of 0, is a second quality (refused), not
    taken for the failure's own as a pre-upgrade row's is."""
    router = live.router
    key, _ = _tenant(router)
    tenant, decision_id = _decide(live, key, router.add_model(answer=FakeModel("own")))
    FeedbackSender(live.app.state.routing)._post([(
        tenant, decision_id, dict(OUTCOME), Recorded(tenant.id, decision_id, 0.0, None))])
    assert _row(live, decision_id).event_id == "gateway"
    assert live.app.state.routing.writer.flush(timeout=5.0)
    defaults = live.app.state.gateway.defaults
    assert defaults.drained(tenant.id, decision_id, "user", OUTCOME) == {
        **OUTCOME, "quality": None}
    assert _rows(router, key, decision_id, 1)["gateway"]["quality"] == 0.0


@pytest.mark.parametrize("claimed_before", [False, True])
@pytest.mark.parametrize("error", [IntegrityError, DataError])
def test_drained_quality_refused_by_the_database_releases_its_claim(
        live: Live, monkeypatch: pytest.MonkeyPatch, error: type,
        claimed_before: bool) -> None:
    """A buffered rating whose row the database refuses (not an outage) is dropped by
    the drain: its claim goes with it, and the call's default is due again with its
    time. ``claimed_before``: the rating claimed when it was posted, then was buffered.
    Before, the row stayed ``replaced``: neither quality was ever learned."""
    router = live.router
    key, _ = _tenant(router)
    tenant, decision_id = _decide(live, key, router.add_model(answer=FakeModel("refused")))
    defaults = live.app.state.gateway.defaults
    due = m.utcnow() + timedelta(hours=1)
    defaults.record([Recorded(tenant.id, decision_id, 0.7, due)])
    if claimed_before:
        assert defaults.claim(tenant.id, decision_id, "rating") is not None
    _drain_refused(live, monkeypatch, error, SpooledFeedback(
        1, tenant.id, decision_id, "rating", {**OUTCOME, "quality": 0.2},
        m.utcnow().isoformat()))
    row = _row(live, decision_id)
    assert (row.state, row.event_id, row.quality) == ("pending", None, 0.7)
    assert row.due_at is not None and abs((m.as_utc(row.due_at) - due).total_seconds()) < 1


def _drain_refused(live: Live, monkeypatch: pytest.MonkeyPatch, error: type,
                   *items: SpooledFeedback) -> None:
    """The drain of ``items`` (one batch), whose rows the database refuses with
    ``error``."""
    # The drain waits for the decision's row (ingest.drain): written first here.
    assert live.app.state.routing.writer.flush(timeout=5.0)
    ingest = live.app.state.routing.sink

    def refuse(items: object) -> None:
        raise error("INSERT INTO feedback", {}, Exception("refused"))

    with monkeypatch.context() as mp:
        mp.setattr(ingest, "store_many", refuse)
        ingest._drain_batch(list(items))


@pytest.mark.parametrize("pre_upgrade", [False, True])
def test_drained_failure_refused_by_the_database_gives_its_row_back(
        live: Live, monkeypatch: pytest.MonkeyPatch, pre_upgrade: bool) -> None:
    """A client gateway's failure recorded ``final`` and buffered, whose row the
    database then refuses: dropped, its 0 was never stored, so its ``final`` row goes
    (as after an unsent refusal) and the client's rating is taken. ``pre_upgrade``: a
    row without its event id (taken by the drain first). Before, the row stayed: no
    quality ever learned for the call, the rating refused."""
    auth, tenant, decision_id = _failed(live, "litellm-11")
    if pre_upgrade:
        _pre_upgrade(live, decision_id)
    _drain_refused(live, monkeypatch, IntegrityError, SpooledFeedback(
        1, tenant.id, decision_id, "litellm-11", OUTCOME, m.utcnow().isoformat()))
    with Session(live.app.state.routing.engine) as session:
        assert session.get(m.QualityDefault, decision_id) is None
    r = _post(live.router, auth, decision_id, quality=0.9, event_id="user")
    assert r.status_code == 202 and r.json()["status"] == "applied", r.text
