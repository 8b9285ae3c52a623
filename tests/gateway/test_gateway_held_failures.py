"""A gateway failure whose record() failed (service/gateway/feedback.py): its outcome is
held and its record tried again before it is posted, so that a later rating is refused
(or, one that came first, keeps the 0 out) in both modes, not only when the outage
buffer drains it. SQLite and PostgreSQL (the ``live`` service of
tests/gateway/conftest.py)."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from service.gateway import feedback
from service.gateway.feedback import FeedbackSender
from service.quality_defaults import OUTCOME_EVENT, QualityDefaults, Recorded
from tests.gateway.conftest import Live
from tests.gateway.test_gateway_failure_rows import _call
from tests.gateway.test_quality_default import _post, _row, _rows
from tests.gateway.test_quality_default_rows import OUTCOME


def _record_fails_once(monkeypatch: pytest.MonkeyPatch, defaults: QualityDefaults,
                       error: Exception | None = None) -> None:
    record, calls = defaults.record, []

    def flaky(rows: list[Recorded]) -> set[str]:
        calls.append(1)
        if len(calls) == 1:
            raise error or ConnectionError("the database is away")
        return record(rows)

    monkeypatch.setattr(defaults, "record", flaky)


def test_failure_whose_record_failed_is_recorded_before_its_outcome(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """record() fails once: the failure's outcome is held, and stored (with its 0) only
    once its record is written in a later round (HELD_RETRY_S, no new batch needed);
    the client's later rating is refused. Before, the outcome was stored at once
    without a record: the rating was taken and both were learned."""
    key, auth, tenant, decision_id = _call(live, "held failure")
    defaults = live.app.state.gateway.defaults
    _record_fails_once(monkeypatch, defaults)
    monkeypatch.setattr(feedback, "HELD_RETRY_S", 0.2, raising=False)

    async def run() -> tuple[int, int]:
        sender = FeedbackSender(live.app.state.routing, max_wait_s=0.01)
        sender.start()
        sender.report(tenant, decision_id, quality=0.0, cost_usd=None, latency_ms=3.0,
                      default=Recorded(tenant.id, decision_id, 0.0, None))
        await asyncio.sleep(0.1)
        held = sender.queued()
        started = time.monotonic()
        while sender.queued() and time.monotonic() - started < 10.0:
            await asyncio.sleep(0.05)
        left = sender.queued()
        await sender.aclose()
        return held, left

    held, left = asyncio.run(run())
    r = _post(live.router, auth, decision_id, quality=0.9, event_id="user")
    assert r.status_code == 409 and "the call failed" in r.json()["detail"], r.text
    row = _row(live, decision_id)
    assert (row.state, row.quality, row.event_id) == ("final", 0.0, OUTCOME_EVENT)
    assert (held, left) == (1, 0)
    assert _rows(live.router, key, decision_id, 1)[OUTCOME_EVENT]["quality"] == 0.0


def test_held_failure_rated_meanwhile_keeps_its_zero_out(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client rated the call while its failure's outcome was held: the next round's
    record() finds the rating, and the outcome is stored without the 0 (its latency
    kept). Before, the 0 was stored at once and the rating taken too."""
    key, auth, tenant, decision_id = _call(live, "held then rated")
    _record_fails_once(monkeypatch, live.app.state.gateway.defaults)
    sender = FeedbackSender(live.app.state.routing)
    sender._post([(tenant, decision_id, dict(OUTCOME),
                   Recorded(tenant.id, decision_id, 0.0, None))])
    r = _post(live.router, auth, decision_id, quality=0.9, event_id="user")
    assert r.status_code == 202 and r.json()["status"] == "applied", r.text
    sender._post([])
    rows = _rows(live.router, key, decision_id, 2)
    assert rows[OUTCOME_EVENT]["quality"] is None
    assert rows[OUTCOME_EVENT]["latency_ms"] == 3.0
    assert rows["user"]["quality"] == 0.9


@pytest.mark.parametrize("why", ["bound", "age", "refused"])
def test_failures_past_the_bound_or_refused_are_posted_as_before(
        live: Live, monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    """More failures than HELD_MAX whose record() failed, held longer than HELD_MAX_S
    (an outage: posted into the outage buffer, not kept only in memory), or a record the
    database refused (an integrity error: trying again would not help): posted at once,
    unrecorded (as before this hold), so that an outage never keeps them unbounded in
    memory nor a refused row holds them for ever."""
    key, _, tenant, decision_id = _call(live, f"held past the bound {why}")
    if why in ("bound", "age"):
        _record_fails_once(monkeypatch, live.app.state.gateway.defaults)
        monkeypatch.setattr(feedback, "HELD_MAX" if why == "bound" else "HELD_MAX_S", 0)
    else:
        _record_fails_once(monkeypatch, live.app.state.gateway.defaults, IntegrityError(
            "INSERT INTO quality_defaults", {}, Exception("refused")))
    sender = FeedbackSender(live.app.state.routing)
    sender._post([(tenant, decision_id, dict(OUTCOME),
                   Recorded(tenant.id, decision_id, 0.0, None))])
    assert not sender._held
    assert _rows(live.router, key, decision_id, 1)[OUTCOME_EVENT]["quality"] == 0.0


def test_failure_whose_record_committed_unanswered_keeps_its_zero(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """record() committed but its answer was lost (the connection dropped at COMMIT):
    the outcome is held and the retry meets the failure's own final row, which is its
    own: the 0 is stored and a later rating refused. Before, the retry took the row for
    a reported quality and stripped the 0: the call learned no quality at all."""
    key, auth, tenant, decision_id = _call(live, "commit unanswered")
    defaults = live.app.state.gateway.defaults
    record, calls = defaults.record, []

    def unanswered(rows: list[Recorded]) -> set[str]:
        calls.append(1)
        done = record(rows)
        if len(calls) == 1:
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        return done

    monkeypatch.setattr(defaults, "record", unanswered)
    sender = FeedbackSender(live.app.state.routing)
    sender._post([(tenant, decision_id, dict(OUTCOME),
                   Recorded(tenant.id, decision_id, 0.0, None))])
    assert sender._held
    sender._post([])
    assert not sender._held
    assert _rows(live.router, key, decision_id, 1)[OUTCOME_EVENT]["quality"] == 0.0
    r = _post(live.router, auth, decision_id, quality=0.9, event_id="user")
    assert r.status_code == 409, r.text
