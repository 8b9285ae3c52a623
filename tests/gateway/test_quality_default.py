"""A tenant's ``success_quality`` is a default: the client's own quality replaces it.

The openai SDK calls the real service (SQLite and PostgreSQL) in front of the fake
upstream; the client rates with ``POST /v1/feedback``. What is checked is what the
learner learned (the quality observations of the model in every policy) and the
feedback rows (what a replay learns). Before service/quality_defaults.py, a rated call
was learned twice: the router's 0.7 at once, and the client's quality in addition.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from sqlalchemy import event
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session

from service.db import models as m
from service.exceptions import ConflictError, UnavailableError
from service.gateway.feedback import FeedbackSender
from service.quality_defaults import QualityDefaults, Recorded
from service.routing import TenantState
from service.spool import FeedbackSpool, buffer_dir, spool_path
from tests.fakes.openai_upstream import FakeModel, running_upstream
from tests.gateway.conftest import KEY_ENV, TIMEOUT_S, UPSTREAM_KEY, Live, Router
from tests.service.conftest import make_settings
from tests.service.live import live_server

MESSAGES = [{"role": "user", "content": "Summarize the bandit problem."}]
#: The tenants' quality_wait_seconds here (the applier looks every 0.5 s).
WAIT_S = 1.0


def _tenant(router: Router, **gateway: object) -> tuple[str, dict[str, str]]:
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    r = router.http.put("/v1/tenants/me/gateway", headers=auth,
                        json={"success_quality": 0.7, "quality_wait_seconds": WAIT_S,
                              **gateway})
    assert r.status_code == 200, r.text
    return key, auth


def _call(router: Router, key: str, model: str) -> str:
    client = openai.OpenAI(base_url=f"{router.base_url}/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES)
    assert raw.parse().choices[0].message.content
    return raw.headers["x-router-decision-id"]


def _rows(router: Router, key: str, decision_id: str, n: int) -> dict[str, dict]:
    fb = router.decision(key, decision_id, feedback=n)["feedback"]
    return {f["event_id"]: f for f in fb}


def _after_wait(live: Live, model: str, want: int) -> None:
    deadline = time.monotonic() + WAIT_S + 10.0
    while live.learned(model) != {want} and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(WAIT_S + 1.0)  # a default that should not come has had its chance


def test_client_quality_replaces_the_default(live: Live) -> None:
    router = live.router
    model = router.add_model(answer=FakeModel("replaced"))
    key, auth = _tenant(router)
    decision_id = _call(router, key, model)
    r = router.http.post("/v1/feedback", headers=auth, json={
        "decision_id": decision_id, "quality": 0.2, "event_id": "rating"})
    assert r.status_code == 202, r.text
    _after_wait(live, model, 1)
    assert live.learned(model) == {1}  # once, not twice
    rows = _rows(router, key, decision_id, 2)
    assert set(rows) == {"gateway", "rating"}, rows
    assert rows["gateway"]["quality"] is None and rows["gateway"]["latency_ms"] is not None
    assert rows["rating"]["quality"] == 0.2
    # The same event again: the documented duplicate; another event: refused.
    r = router.http.post("/v1/feedback", headers=auth, json={
        "decision_id": decision_id, "quality": 0.2, "event_id": "rating"})
    assert r.status_code == 202 and r.json()["status"] == "duplicate", r.text
    r = router.http.post("/v1/feedback", headers=auth, json={
        "decision_id": decision_id, "quality": 0.9, "event_id": "second"})
    assert r.status_code == 409, r.text
    assert r.json()["type"].endswith("quality-already-reported")
    assert "replaced by the quality of event 'rating'" in r.json()["detail"]
    # Cost and latency without a quality are still taken.
    r = router.http.post("/v1/feedback", headers=auth, json={
        "decision_id": decision_id, "latency_ms": 12.0, "event_id": "later"})
    assert r.status_code == 202, r.text
    assert live.learned(model) == {1}


def test_default_learned_when_no_quality_comes_then_a_late_one_is_refused(
        live: Live) -> None:
    router = live.router
    model = router.add_model(answer=FakeModel("defaulted"))
    key, auth = _tenant(router)
    decision_id = _call(router, key, model)
    assert _rows(router, key, decision_id, 1)["gateway"]["quality"] is None
    assert live.learned(model) == {0}  # provisional: not learned yet
    rows = _rows(router, key, decision_id, 2)
    assert rows["gateway-default"]["quality"] == 0.7
    assert live.learned(model) == {1}
    r = router.http.post("/v1/feedback", headers=auth, json={
        "decision_id": decision_id, "quality": 0.1})
    assert r.status_code == 409, r.text
    assert "quality_wait_seconds" in r.json()["detail"]
    assert r.json()["errors"][0]["field"] == "quality"
    time.sleep(0.6)
    assert live.learned(model) == {1}
    assert len(router.decision(key, decision_id)["feedback"]) == 2


def test_failed_call_keeps_its_zero_and_refuses_a_rating(live: Live) -> None:
    router = live.router
    model = router.add_model(answer=FakeModel("down"))
    key, auth = _tenant(router)
    router.upstream.set(model, status=503)
    r = router.http.post("/v1/chat/completions", headers=auth,
                         json={"model": model, "messages": MESSAGES})
    assert r.status_code == 502, r.text
    decision_id = r.headers["x-router-decision-id"]
    assert _rows(router, key, decision_id, 1)["gateway"]["quality"] == 0.0
    # Recorded before the outcome is stored (service/gateway/feedback.py).
    r = router.http.post("/v1/feedback", headers=auth, json={
        "decision_id": decision_id, "quality": 0.9, "event_id": "x"})
    assert r.status_code == 409, r.text
    assert "the call failed" in r.json()["detail"]


def test_wait_setting_refuses_bad_values(live: Live) -> None:
    router = live.router
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    for bad in (-1, 86_401, None, "5"):
        r = router.http.put("/v1/tenants/me/gateway", headers=auth,
                            json={"quality_wait_seconds": bad})
        assert r.status_code == 422, (bad, r.text)
        assert "quality_wait_seconds" in r.text
    r = router.http.get("/v1/tenants/me/gateway", headers=auth)
    assert r.json()["quality_wait_seconds"] == 300.0


def test_pending_default_survives_a_restart(new_database_url, monkeypatch) -> None:
    """The default waits in the database, not in the process: a restart during the wait
    still learns it once the wait is over (and only once)."""
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    settings = make_settings(new_database_url(), featurizer="hashing",
                             upstream_timeout_s=TIMEOUT_S)
    with running_upstream() as upstream:
        apps: list[FastAPI] = []
        with live_server(settings, prepare=apps.append) as base, \
                httpx.Client(base_url=base, timeout=30) as http:
            router = Router(base, upstream, http)
            model = router.add_model(answer=FakeModel("before the restart"))
            key, _ = _tenant(router, quality_wait_seconds=5.0)
            decision_id = _call(router, key, model)
            _rows(router, key, decision_id, 1)  # stored with its record
        # Stopped within the wait: nothing of the default was learned.
        assert {p.observations(model)["quality"]
                for p in apps[0].state.routing.shared.values()} == {0}
        with live_server(settings, prepare=apps.append) as base, \
                httpx.Client(base_url=base, timeout=30) as http:
            again = Live(Router(base, upstream, http), apps[1])
            assert _rows(again.router, key, decision_id, 2)["gateway-default"][
                "quality"] == 0.7
            _after_wait(again, model, 1)
            assert again.learned(model) == {1}


def test_quality_buffered_by_a_previous_run_claims_when_drained(
        new_database_url, monkeypatch, tmp_path) -> None:
    """A client's rating the previous run buffered (the database away) and did not
    drain: the restart drains it before serving, and it claims then as it would have
    when posted: the call failed (the plug-in's final 0), so its quality is not stored.
    Before, the drain ran before the gateway wired its defaults: stored unclaimed."""
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    settings = make_settings(new_database_url(), featurizer="hashing",
                             upstream_timeout_s=TIMEOUT_S, feedback_buffer_dir=tmp_path)
    apps: list[FastAPI] = []
    with running_upstream() as upstream:
        with live_server(settings, prepare=apps.append) as base, \
                httpx.Client(base_url=base, timeout=30) as http:
            live = Live(Router(base, upstream, http), apps[0])
            key = live.router.tenant()
            tenant, decision_id = _decide(live, key, live.router.add_model(
                answer=FakeModel("restart drain")))
            r = _post(live.router, {"Authorization": f"Bearer {key}"}, decision_id,
                      quality=0.0, latency_ms=2.0, failed=True, event_id="litellm-1")
            assert r.status_code == 202, r.text
        spool = FeedbackSpool(spool_path(buffer_dir(settings),
                                         settings.resolved_database_url()), 10)
        assert spool.add(tenant.id, decision_id, "user", {
            "quality": 0.9, "cost_usd": None, "latency_ms": 7.0},
            m.utcnow().isoformat()) == "buffered"
        spool.close()
        with live_server(settings, prepare=apps.append) as base, \
                httpx.Client(base_url=base, timeout=30) as http:
            rows = _rows(Router(base, upstream, http), key, decision_id, 2)
    assert rows["user"]["quality"] is None and rows["user"]["latency_ms"] == 7.0
    assert rows["litellm-1"]["quality"] == 0.0


def test_default_quality_of_a_client_gateway_refuses_bad_input(live: Live) -> None:
    router = live.router
    model = router.add_model(answer=FakeModel("own gateway"))
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    decision_id = _call(router, key, model)
    for body, field in (({"default_quality": 1.5}, "default_quality"),
                        ({"default_quality": 0.5, "quality": 0.5}, "not both")):
        r = router.http.post("/v1/feedback", headers=auth,
                             json={"decision_id": decision_id, **body})
        assert r.status_code == 422 and field in r.text, (body, r.text)
    r = router.http.post("/v1/feedback", headers=auth, json={
        "decision_id": decision_id, "default_quality": 0.5})
    assert r.status_code == 202 and r.json()["status"] == "pending", r.text


def _decide(live: Live, key: str, model: str) -> tuple[TenantState, str]:
    """A decision of the tenant's made without the gateway (no outcome of the router's)."""
    r = live.router.http.post("/v1/decide", headers={"Authorization": f"Bearer {key}"},
                              json={"query": {"text": "summarize"}, "candidates": [model]})
    assert r.status_code == 200, r.text
    return live.app.state.routing.tenant_for_key(key), r.json()["decision_id"]


def _row(live: Live, decision_id: str) -> m.QualityDefault:
    with Session(live.app.state.routing.engine) as session:
        row = session.get(m.QualityDefault, decision_id)
    assert row is not None
    return row


def test_released_claim_leaves_the_default_due(live: Live) -> None:
    """A client's quality came first (a marker), the gateway recorded its default, then
    the sink refused the quality: the default is pending again, with its due time (it
    was stuck pending with none, never applied nor pruned)."""
    router = live.router
    key, _ = _tenant(router)
    tenant, decision_id = _decide(live, key, router.add_model(answer=FakeModel("m")))
    defaults = live.app.state.gateway.defaults
    claim = defaults.claim(tenant.id, decision_id, "rating")
    assert claim is not None
    due = m.utcnow() + timedelta(hours=1)
    assert defaults.record([Recorded(tenant.id, decision_id, 0.7, due)]) == {decision_id}
    defaults.release(claim)
    row = _row(live, decision_id)
    assert row.state == "pending" and row.due_at is not None


def test_released_claim_of_a_failed_call_takes_the_clients_retry(live: Live) -> None:
    """A client's rating claimed first, the plug-in's failure then came (its 0 not
    stored: the rating came first), then the sink refused the rating with nothing sent:
    the client's retry of its rating is taken. Before, the release made the row final:
    the retry was refused (409) and neither quality was learned."""
    router = live.router
    model = router.add_model(answer=FakeModel("released failure"))
    key, auth = _tenant(router)
    tenant, decision_id = _decide(live, key, model)
    defaults = live.app.state.gateway.defaults
    claim = defaults.claim(tenant.id, decision_id, "user")
    assert claim is not None
    r = _post(router, auth, decision_id, quality=0.0, latency_ms=4.0, failed=True,
              event_id="litellm-4")
    assert r.status_code == 202, r.text
    defaults.release(claim)  # the sink refused the rating: nothing stored
    r = _post(router, auth, decision_id, quality=0.9, event_id="user")
    assert r.status_code == 202 and r.json()["status"] == "applied", r.text
    rows = _rows(router, key, decision_id, 2)
    assert rows["user"]["quality"] == 0.9 and rows["litellm-4"]["quality"] is None
    assert live.learned(model) == {1}


def test_failed_call_rated_before_its_record_reports_no_second_quality(
        live: Live) -> None:
    """The client's quality for a failed call came before the gateway's batch recorded
    the failure: stored (it came first); the router's 0 is then not reported too."""
    router = live.router
    model = router.add_model(answer=FakeModel("late record"))
    key, auth = _tenant(router)
    tenant, decision_id = _decide(live, key, model)
    r = router.http.post("/v1/feedback", headers=auth, json={
        "decision_id": decision_id, "quality": 0.9, "event_id": "x"})
    assert r.status_code == 202, r.text
    FeedbackSender(live.app.state.routing)._post([(
        tenant, decision_id, {"quality": 0.0, "cost_usd": None, "latency_ms": 5.0},
        Recorded(tenant.id, decision_id, 0.0, None))])
    rows = _rows(router, key, decision_id, 2)
    assert rows["x"]["quality"] == 0.9
    assert rows["gateway"]["quality"] is None and rows["gateway"]["latency_ms"] == 5.0
    assert live.learned(model) == {1}


def test_default_quality_for_another_tenants_decision_is_not_found(live: Live) -> None:
    router = live.router
    model = router.add_model(answer=FakeModel("owner"))
    key, auth = _tenant(router)
    decision_id = _call(router, key, model)
    other = {"Authorization": f"Bearer {router.tenant()}"}
    r = router.http.post("/v1/feedback", headers=other, json={
        "decision_id": decision_id, "default_quality": 0.1})
    assert r.status_code == 404, r.text
    # The owner's own claim still works.
    r = router.http.post("/v1/feedback", headers=auth, json={
        "decision_id": decision_id, "quality": 0.3, "event_id": "own"})
    assert r.status_code == 202, r.text
    assert _row(live, decision_id).state == "replaced"


def test_claimed_on_a_replica_whose_settings_are_not_reloaded(live: Live) -> None:
    """Another replica recorded the tenant's default; this one's cached settings say
    the tenant has no defaults: the client's quality still claims the row."""
    router = live.router
    key, _ = _tenant(router)
    tenant, decision_id = _decide(live, key, router.add_model(answer=FakeModel("r2")))
    routing = live.app.state.routing
    stale = QualityDefaults(routing.engine, lambda _: False, lambda _: WAIT_S, print)
    stale.record([Recorded(tenant.id, decision_id, 0.7, m.utcnow() + timedelta(hours=1))])
    assert stale.claim(tenant.id, decision_id, "rating") is not None
    assert _row(live, decision_id).state == "replaced"
    with pytest.raises(ConflictError):
        stale.claim(tenant.id, decision_id, "second")
    # A decision without a row (never a default): nothing claimed, no row made.
    _, plain = _decide(live, router.tenant(), router.add_model(answer=FakeModel("r3")))
    assert stale.claim(tenant.id, plain, "rating") is None
    with Session(routing.engine) as session:
        assert session.get(m.QualityDefault, plain) is None


def test_failure_of_a_client_gateway_is_final(live: Live) -> None:
    """A client's gateway (the LiteLLM plug-in) posts a failed call's quality with
    ``failed``: learned at once and final, as the router's gateway's own failure: a later
    quality for the call is a 409. The tenant sets no success_quality (the plug-in's
    tenant). Before, the failure's 0 was an ordinary quality: a rating was learned too."""
    router = live.router
    model = router.add_model(answer=FakeModel("plug-in failure"))
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    _, decision_id = _decide(live, key, model)
    failure = {"quality": 0.0, "latency_ms": 9.0, "failed": True, "event_id": "litellm-1"}
    for status in ("applied", "duplicate"):  # the callback, then its retry
        r = _post(router, auth, decision_id, **failure)
        assert r.status_code == 202 and r.json()["status"] == status, r.text
    r = _post(router, auth, decision_id, quality=0.9, event_id="user")
    assert r.status_code == 409 and "the call failed" in r.json()["detail"], r.text
    assert _rows(router, key, decision_id, 1)["litellm-1"]["quality"] == 0.0
    assert live.learned(model) == {1}
    assert _row(live, decision_id).state == "final"


def test_failure_of_a_client_gateway_after_the_clients_quality(live: Live) -> None:
    """The client rated the call before the plug-in's failure came: the client's stays,
    the failure's 0 is not stored too (its latency is), as for the gateway's batch. The
    tenant's claims are on (a default_quality or failure of the plug-in's before)."""
    router = live.router
    model = router.add_model(answer=FakeModel("plug-in late failure"))
    key, auth = _tenant(router)
    _, decision_id = _decide(live, key, model)
    for body in ({"quality": 0.9, "event_id": "user"},
                 {"quality": 0.0, "latency_ms": 4.0, "failed": True, "event_id": "litellm-2"}):
        r = _post(router, auth, decision_id, **body)
        assert r.status_code == 202, r.text
    rows = _rows(router, key, decision_id, 2)
    assert rows["user"]["quality"] == 0.9
    assert rows["litellm-2"]["quality"] is None and rows["litellm-2"]["latency_ms"] == 4.0
    assert live.learned(model) == {1}


@pytest.mark.parametrize("unsent", [True, False])
def test_failure_refused_by_the_sink(live: Live, monkeypatch: pytest.MonkeyPatch,
                                     unsent: bool) -> None:
    """The sink answers a client gateway's failure with 503. Certainly not stored
    (``unsent``: e.g. the outage buffer full, on every attempt of the plug-in): its
    ``final`` row goes, the client's rating is taken (and the failure's retry stores its
    latency only). Maybe stored: the row stays, the rating is refused and the retry of
    the same event is a duplicate. Before, an unsent failure kept its row: the rating
    got a false 409 and no quality was learned."""
    router = live.router
    model = router.add_model(answer=FakeModel(f"sink refusal {unsent}"))
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    _, decision_id = _decide(live, key, model)
    sink = live.app.state.routing.sink
    failure = {"quality": 0.0, "latency_ms": 3.0, "failed": True, "event_id": "litellm-3"}
    with monkeypatch.context() as patch:
        patch.setattr(sink, "submit", _refusing(sink.submit, unsent))
        for _ in range(2):  # the plug-in's attempts
            r = _post(router, auth, decision_id, **failure)
            assert r.status_code == 503, r.text
    rating = _post(router, auth, decision_id, quality=0.9, event_id="user")
    assert rating.status_code == (202 if unsent else 409), rating.text
    retry = _post(router, auth, decision_id, **failure)
    assert retry.status_code == 202, retry.text
    assert retry.json()["status"] == ("applied" if unsent else "duplicate")
    rows = _rows(router, key, decision_id, 2 if unsent else 1)
    if unsent:
        assert rows["user"]["quality"] == 0.9
        assert rows["litellm-3"]["quality"] is None
    else:
        assert list(rows) == ["litellm-3"] and rows["litellm-3"]["quality"] == 0.0
    assert live.learned(model) == {1}


def _first_attempt_refused_after_its_retry(live: Live, tenant: TenantState,
                                           decision_id: str, outcome: dict[str, Any],
                                           event_id: str, **kwargs: Any) -> Any:
    """A feedback's first attempt waits for the sink while the caller's retry of the
    same event is stored; then the first is refused with nothing sent. The retry's
    receipt."""
    routing = live.app.state.routing
    real_submit, retried = routing.sink.submit, []

    def retry_then_refuse(*args: Any) -> Any:
        if retried:  # the retry's own submit
            return real_submit(*args)
        retried.append(None)
        retried.append(routing.feedback(tenant, decision_id, outcome, event_id, **kwargs))
        err = UnavailableError("the sink refused it; retry", retry_after_s=1)
        err.unsent = True
        raise err

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(routing.sink, "submit", retry_then_refuse)
        with pytest.raises(UnavailableError):
            routing.feedback(tenant, decision_id, outcome, event_id, **kwargs)
    return retried[1]


def test_unsent_failure_keeps_the_row_of_its_concurrent_retry(live: Live) -> None:
    """The first attempt of a failure is refused with nothing sent after its retry was
    stored: its undo must keep the row (the retry's 0 is stored), so the client's rating
    is still refused."""
    router = live.router
    model = router.add_model(answer=FakeModel("concurrent retry"))
    key = router.tenant()
    tenant, decision_id = _decide(live, key, model)
    outcome = {"quality": 0.0, "cost_usd": None, "latency_ms": 3.0}
    retry = _first_attempt_refused_after_its_retry(live, tenant, decision_id, outcome,
                                                   "litellm-4", final=True)
    assert retry.status == "applied"
    assert _row(live, decision_id).state == "final"
    rating = _post(router, {"Authorization": f"Bearer {key}"}, decision_id, quality=0.9,
                   event_id="user")
    assert rating.status_code == 409, rating.text
    assert live.learned(model) == {1}


def test_unsent_rating_keeps_the_claim_of_its_concurrent_retry(live: Live) -> None:
    """A client's rating claims the call's default; its first attempt is refused with
    nothing sent after its retry was stored: the claim stays (the retry's stamp), and
    the default is never learned in addition. Before, the first attempt's release
    gave the claim back (docs/api.md said not to retry while waiting)."""
    router = live.router
    model = router.add_model(answer=FakeModel("concurrent rating"))
    key, _ = _tenant(router)
    tenant, decision_id = _decide(live, key, model)
    defaults = live.app.state.gateway.defaults
    due = m.utcnow() + timedelta(hours=1)
    assert defaults.record([Recorded(tenant.id, decision_id, 0.7, due)]) == set()
    outcome = {"quality": 0.9, "cost_usd": None, "latency_ms": None}
    retry = _first_attempt_refused_after_its_retry(live, tenant, decision_id, outcome,
                                                   "user")
    assert retry.status == "applied"
    row = _row(live, decision_id)
    assert (row.state, row.event_id) == ("replaced", "user")
    assert live.learned(model) == {1}


def test_refused_quality_whose_release_fails_keeps_the_sinks_answer(
        live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sink refused a claimed quality with nothing sent, and giving the claim back
    failed with a database error other than a lost connection: the answer is still the
    sink's 503 (the claim stays, as when the database is away). Before, a 500."""
    router = live.router
    key, auth = _tenant(router)
    _, decision_id = _decide(live, key, router.add_model(answer=FakeModel("release fails")))
    routing = live.app.state.routing

    def refuse_release(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if "quality_defaults" in statement and not statement.lstrip().startswith(
                ("INSERT", "SELECT")):
            raise DatabaseError(statement, parameters, Exception("refused"))

    event.listen(routing.engine, "before_cursor_execute", refuse_release)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(routing.sink, "submit", _refusing(routing.sink.submit, True))
            r = _post(router, auth, decision_id, quality=0.9, event_id="user")
    finally:
        event.remove(routing.engine, "before_cursor_execute", refuse_release)
    assert r.status_code == 503, r.text
    assert _row(live, decision_id).state == "replaced"


def _refusing(submit: Any, unsent: bool) -> Any:
    """A sink's ``submit`` that stores when not ``unsent`` and answers 503 either way."""
    def refuse(*args: Any) -> Any:
        if not unsent:
            submit(*args)
        err = UnavailableError("the sink refused it; retry", retry_after_s=1)
        err.unsent = unsent
        raise err
    return refuse


@pytest.mark.parametrize("event", ["litellm-1", None])
def test_buffered_failure_keeps_its_zero(live: Live, event: str | None) -> None:
    """A client gateway's failure recorded ``final`` whose feedback the sink buffered
    (the database away): drained, it is the failure's own quality, stored with its 0;
    another event's quality is still refused. Before, the drain took the failure's 0 for
    a second quality and stripped it: no quality learned, later ratings refused. Without
    an event id (LiteLLM had no call id) the same, and a client's rating without one is
    the failure's duplicate: before, the row kept None and the drain claimed with ""."""
    router = live.router
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    model = router.add_model(answer=FakeModel(f"buffered {event}"))
    tenant, decision_id = _decide(live, key, model)
    failure = {"quality": 0.0, "latency_ms": 3.0, "failed": True}
    r = _post(router, auth, decision_id, **failure,
              **({} if event is None else {"event_id": event}))
    assert r.status_code == 202, r.text
    # The same event as the drain hands it over had the sink buffered it.
    defaults = live.app.state.gateway.defaults
    outcome = {"quality": 0.0, "cost_usd": None, "latency_ms": 3.0}
    assert defaults.drained(tenant.id, decision_id, event or "", outcome) == outcome
    assert defaults.drained(tenant.id, decision_id, "user", {**outcome, "quality": 0.9}) \
        == {**outcome, "quality": None}
    assert _row(live, decision_id).state == "final"
    if event is None:
        r = _post(router, auth, decision_id, quality=0.9)
        assert r.status_code == 202 and r.json()["status"] == "duplicate", r.text
        assert live.learned(model) == {1}


def test_buffered_quality_for_an_unknown_decision_leaves_no_marker(live: Live) -> None:
    """A buffered quality whose decision does not exist, or is another tenant's: the
    drain drops it (the store answers unknown-decision) and leaves no marker. Before,
    its claim left a ``replaced`` row of the wrong tenant, which kept the real owner's
    default from ever being recorded."""
    router = live.router
    key, _ = _tenant(router)
    tenant = live.app.state.routing.tenant_for_key(key)
    _, others = _decide(live, router.tenant(), router.add_model(answer=FakeModel("other")))
    defaults = live.app.state.gateway.defaults
    outcome = {"quality": 0.5, "cost_usd": None, "latency_ms": None}
    for decision_id in (others, "00000000-0000-0000-0000-000000000000"):
        assert defaults.drained(tenant.id, decision_id, "x", outcome) == outcome
        with Session(live.app.state.routing.engine) as session:
            assert session.get(m.QualityDefault, decision_id) is None


def test_failed_refuses_bad_combinations(live: Live) -> None:
    router = live.router
    model = router.add_model(answer=FakeModel("failed bad input"))
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    _, decision_id = _decide(live, key, model)
    for body in ({"failed": True, "latency_ms": 1.0},
                 {"failed": True, "default_quality": 0.5},
                 {"failed": True, "quality": 0.0, "default_quality": 0.5},
                 {"failed": "yes", "quality": 0.0}):
        r = _post(router, auth, decision_id, **body)
        assert r.status_code == 422 and "failed" in r.text, (body, r.text)
    # Nothing was recorded: an ordinary quality is still learned.
    r = _post(router, auth, decision_id, quality=0.4, event_id="user")
    assert r.status_code == 202 and r.json()["status"] == "applied", r.text


def _post(router: Router, auth: dict[str, str], decision_id: str,
          **body: object) -> httpx.Response:
    return router.http.post("/v1/feedback", headers=auth,
                            json={"decision_id": decision_id, **body})


def test_second_failure_of_another_event_is_refused(live: Live) -> None:
    """Two failures with different event ids for one call: the second is a 409 (the
    claim path's), not a second 0. Before, both were stored and learned."""
    router = live.router
    model = router.add_model(answer=FakeModel("two failures"))
    key = router.tenant()
    auth = {"Authorization": f"Bearer {key}"}
    _, decision_id = _decide(live, key, model)
    r = _post(router, auth, decision_id, quality=0.0, failed=True, event_id="fail-a")
    assert r.status_code == 202, r.text
    r = _post(router, auth, decision_id, quality=0.0, failed=True, event_id="fail-b")
    assert r.status_code == 409 and "the call failed" in r.json()["detail"], r.text
    assert list(_rows(router, key, decision_id, 1)) == ["fail-a"]
    assert live.learned(model) == {1}


def _interleaved(engine: Any, other: threading.Thread, nth: int, call: Any) -> Any:
    """``call()``, with ``other`` run (another connection) just before the ``nth``
    statement of ``call`` on ``quality_defaults``. SQLite holds the caller's write lock:
    there ``other`` waits for its commit (joined after ``call``)."""
    seen: list[str] = []

    def interleave(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if "quality_defaults" not in statement or other.ident is not None:
            return
        seen.append(statement)
        if len(seen) == nth:
            other.start()
            other.join(timeout=1.0 if engine.dialect.name == "sqlite" else 30.0)

    event.listen(engine, "before_cursor_execute", interleave)
    try:
        return call()
    finally:
        event.remove(engine, "before_cursor_execute", interleave)
        if other.ident is not None:  # (the call may end before its nth statement)
            other.join(timeout=30.0)


@pytest.mark.parametrize("nth", [1, 2])
def test_failure_retry_interleaved_with_its_first_attempts_undo(live: Live,
                                                                nth: int) -> None:
    """Attempt A of a failure wrote the ``final`` row, then is refused unsent: its
    ``unfinal`` runs (another connection) at the ``nth`` statement of retry B's
    ``final`` after its insert. B's row must stay, its own event's: B stores the 0, a
    rating is then refused, B's drain finds its own row. Before, B ran three
    transactions: between them the row was deleted (B's 0 then stored with no undo, the
    rating learned too) or re-made with no event (B's own drain refused its 0)."""
    router = live.router
    tenant, decision_id = _decide(live, router.tenant(), router.add_model(
        answer=FakeModel(f"interleaved failure {nth}")))
    engine = live.app.state.routing.engine
    defaults = QualityDefaults(engine, lambda _: True, lambda _: WAIT_S, print)
    first = defaults.final(tenant.id, decision_id, 0.0, "litellm-1")
    assert first.stamp is not None
    undo = threading.Thread(target=defaults.unfinal, args=(decision_id, first.stamp))
    second = _interleaved(engine, undo, nth + 1,
                          lambda: defaults.final(tenant.id, decision_id, 0.0, "litellm-1"))
    assert not second.replaced
    row = _row(live, decision_id)
    assert (row.state, row.event_id, row.quality) == ("final", "litellm-1", 0.0)
    if second.stamp is not None:  # B wrote the row anew: its own undo takes it
        assert m.as_utc(row.changed_at) == second.stamp
    with pytest.raises(ConflictError):
        defaults.claim(tenant.id, decision_id, "user")
    assert defaults.claim(tenant.id, decision_id, "litellm-1", buffered=True) is None


def test_failure_of_a_call_whose_default_waits_takes_its_place(live: Live) -> None:
    """A default still waits (``pending``) when the client's gateway reports the call
    failed: the failure's 0 takes the row (``final``, its event's), a rating is then a
    409; once the default was learned, the failure's 0 is a 409 itself. Before, the
    pending row kept its state with no due time: a rating claimed it and was learned
    besides the 0, and a failure after the learned default stored a second quality."""
    router = live.router
    tenant, decision_id = _decide(live, router.tenant(), router.add_model(
        answer=FakeModel("failure of a waiting default")))
    defaults = QualityDefaults(live.app.state.routing.engine, lambda _: True,
                               lambda _: WAIT_S, print)
    defaults.record([Recorded(tenant.id, decision_id, 0.7, m.utcnow() + timedelta(hours=1))])
    took = defaults.final(tenant.id, decision_id, 0.0, "litellm-5")
    assert took.stamp is not None and not took.replaced
    row = _row(live, decision_id)
    assert (row.state, row.event_id, row.quality, row.due_at) == (
        "final", "litellm-5", 0.0, None)
    with pytest.raises(ConflictError, match="the call failed"):
        defaults.claim(tenant.id, decision_id, "user")
    other, learned = _decide(live, router.tenant(), router.add_model(
        answer=FakeModel("failure after a learned default")))
    with Session(live.app.state.routing.engine) as session, session.begin():
        session.add(m.QualityDefault(decision_id=learned, tenant_id=other.id, quality=0.7,
                                     state="applied", due_at=None, event_id=None,
                                     changed_at=m.utcnow()))
    with pytest.raises(ConflictError, match="quality_wait_seconds was over"):
        defaults.final(other.id, learned, 0.0, "litellm-6")
    assert _row(live, learned).state == "applied"


def test_failure_refused_unsent_gives_the_waiting_default_back(live: Live) -> None:
    """A failure's 0 took the place of a waiting default, then the sink refused it with
    nothing sent: the default waits again (its quality and due time), as a released
    claim's does. Before, ``unfinal`` deleted the row: the call's default was gone."""
    router = live.router
    tenant, decision_id = _decide(live, router.tenant(), router.add_model(
        answer=FakeModel("failure undone over a waiting default")))
    defaults = QualityDefaults(live.app.state.routing.engine, lambda _: True,
                               lambda _: WAIT_S, print)
    due = m.utcnow() + timedelta(hours=1)
    defaults.record([Recorded(tenant.id, decision_id, 0.7, due)])
    took = defaults.final(tenant.id, decision_id, 0.0, "litellm-7")
    assert took.stamp is not None and took.took is not None
    defaults.unfinal(decision_id, took.stamp, took.took)
    row = _row(live, decision_id)
    assert (row.state, row.quality, row.event_id) == ("pending", 0.7, None)
    assert m.as_utc(row.due_at) == due


def test_failure_whose_row_a_rating_claims_between_its_steps_is_replaced(live: Live) -> None:
    """A default waits; a failure's ``final`` finds no row of its own and no client
    marker; a rating claims the row before ``final`` looks for a waiting default. On
    PostgreSQL (each statement sees what was committed when it starts) the failure must
    find the client's marker (replaced: its 0 is not stored, its cost and latency are),
    not a 409; on SQLite the failure holds the write lock and takes the default first."""
    router = live.router
    tenant, decision_id = _decide(live, router.tenant(), router.add_model(
        answer=FakeModel("rating between a failure's steps")))
    engine = live.app.state.routing.engine
    defaults = QualityDefaults(engine, lambda _: True, lambda _: WAIT_S, print)
    defaults.record([Recorded(tenant.id, decision_id, 0.7, m.utcnow() + timedelta(hours=1))])
    errors: list[Exception] = []

    def rate() -> None:
        try:
            defaults.claim(tenant.id, decision_id, "user")
        except ConflictError as exc:
            errors.append(exc)

    rating = threading.Thread(target=rate)
    # insert, own row, client marker: then (4th) the waiting default
    failure = _interleaved(engine, rating, 4,
                           lambda: defaults.final(tenant.id, decision_id, 0.0, "litellm-8"))
    row = _row(live, decision_id)
    if engine.dialect.name == "sqlite":
        assert failure.stamp is not None and len(errors) == 1
        assert (row.state, row.event_id) == ("final", "litellm-8")
    else:
        assert failure.replaced and not errors
        assert (row.state, row.event_id) == ("replaced", "user")
