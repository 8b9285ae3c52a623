"""Distributed mode: a gateway call's ``success_quality`` is replaced by the client's own
quality, as in embedded mode (tests/gateway/test_quality_default.py), with the real
broker, the real learner and PostgreSQL: the router's default and the client's quality
are feedback events on the topic, and only one of them is ever produced per call."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import openai
import psycopg
import pytest
from fastapi import FastAPI

from service.config import Settings
from service.db.engine import upgrade
from streams.config import StreamsConfig
from streams.learner import Learner, libpq_url
from tests.fakes.openai_upstream import FakeModel, running_upstream
from tests.gateway.conftest import KEY_ENV, UPSTREAM_KEY, Router
from tests.service.conftest import ADMIN_KEY
from tests.service.live import live_server
from tests.streams.helpers import DIM
from tests.streams.test_learner import Running

pytestmark = pytest.mark.integration
WAIT_S = 1.0


@contextmanager
def _distributed(fresh_database_url: str, kafka_bootstrap: str,
                 make_topic: Callable[..., str], unique_group_id: str,
                 monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Router, list[FastAPI]]]:
    """The service in distributed mode (its learner running) in front of the fake
    upstream: the router and the app."""
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    topic, dead = make_topic(partitions=2), make_topic(partitions=1)
    settings = Settings(database_url=fresh_database_url, admin_key=ADMIN_KEY, dim=DIM,
                        policy_seed=3, kafka_bootstrap=kafka_bootstrap, feedback_topic=topic,
                        decisions_topic=make_topic(partitions=1), dead_letter_topic=dead,
                        learner_group=unique_group_id, snapshot_poll_interval_s=0.5,
                        featurizer="hashing")
    upgrade(fresh_database_url)
    learner = Learner(StreamsConfig(bootstrap=kafka_bootstrap, feedback_topic=topic,
                                    dead_letter_topic=dead, group_id=unique_group_id,
                                    dim=DIM), fresh_database_url)
    learner.start(create_topics=False)
    running = Running(learner)
    apps: list[FastAPI] = []
    try:
        with running_upstream() as upstream, \
                live_server(settings, prepare=apps.append) as base, \
                httpx.Client(base_url=base, timeout=30) as http:
            yield Router(base, upstream, http), apps
    finally:
        running.stop()


def test_client_quality_replaces_the_default_through_kafka(
        fresh_database_url: str, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with _distributed(fresh_database_url, kafka_bootstrap, make_topic, unique_group_id,
                      monkeypatch) as (router, apps):
        http, base = router.http, router.base_url
        rated, unrated = (router.add_model(answer=FakeModel(t)) for t in ("r", "u"))
        key = router.tenant()
        auth = {"Authorization": f"Bearer {key}"}
        assert http.put("/v1/tenants/me/gateway", headers=auth, json={
            "success_quality": 0.7, "quality_wait_seconds": WAIT_S}).status_code == 200
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        ids = {}
        for model in (rated, unrated):
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": "hi"}])
            ids[model] = raw.headers["x-router-decision-id"]
        r = http.post("/v1/feedback", headers=auth, json={
            "decision_id": ids[rated], "quality": 0.2, "event_id": "rating"})
        assert r.status_code == 202 and r.json()["status"] == "queued", r.text

        def learned() -> dict[str, set[int]]:
            shared = apps[0].state.routing.shared
            return {m: {p.observations(m)["quality"] for p in shared.values()}
                    for m in (rated, unrated)}

        deadline = time.monotonic() + 60
        while learned() != {rated: {1}, unrated: {1}}:
            assert time.monotonic() < deadline, learned()
            time.sleep(0.2)
        time.sleep(WAIT_S + 2.0)  # a second quality, were one coming, would be here
        assert learned() == {rated: {1}, unrated: {1}}
        # The unrated call's default is learned: a later quality is refused.
        r = http.post("/v1/feedback", headers=auth, json={
            "decision_id": ids[unrated], "quality": 0.1, "event_id": "late"})
        assert r.status_code == 409, r.text
        assert r.json()["type"].endswith("quality-already-reported")
    with psycopg.connect(libpq_url(fresh_database_url)) as conn:
        rows = conn.execute("SELECT decision_id, event_id, quality FROM feedback "
                            "WHERE decision_id = ANY(%s)", (list(ids.values()),)).fetchall()
    by = {(d, e): q for d, e, q in rows}
    assert by == {(ids[rated], "gateway"): None, (ids[rated], "rating"): 0.2,
                  (ids[unrated], "gateway"): None,
                  (ids[unrated], "gateway-default"): 0.7}, rows


def test_failure_whose_record_failed_refuses_a_rating_through_kafka(
        fresh_database_url: str, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed call whose record() failed once (a transient database error): its
    outcome goes to the topic only once the record is written (service/gateway/
    feedback.py holds it), so the client's later rating is refused and only the 0 is
    stored. Before, the outcome went straight to the topic unrecorded: the rating was
    taken (202) and both were learned."""
    with _distributed(fresh_database_url, kafka_bootstrap, make_topic, unique_group_id,
                      monkeypatch) as (router, apps):
        model = router.add_model(answer=FakeModel("down"))
        router.upstream.set(model, status=503)
        key = router.tenant()
        auth = {"Authorization": f"Bearer {key}"}
        assert router.http.put("/v1/tenants/me/gateway", headers=auth, json={
            "success_quality": 0.7, "quality_wait_seconds": WAIT_S}).status_code == 200
        defaults, calls = apps[0].state.gateway.defaults, []
        record = defaults.record

        def flaky(rows: object) -> set[str]:
            calls.append(1)
            if len(calls) == 1:
                raise ConnectionError("the database is away")
            return record(rows)

        monkeypatch.setattr(defaults, "record", flaky)
        r = router.http.post("/v1/chat/completions", headers=auth, json={
            "model": model, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 502, r.text
        decision_id = r.headers["x-router-decision-id"]
        with psycopg.connect(libpq_url(fresh_database_url), autocommit=True) as conn:
            deadline = time.monotonic() + 15
            while conn.execute("SELECT 1 FROM quality_defaults WHERE decision_id = %s AND "
                               "state = 'final'", (decision_id,)).fetchone() is None:
                assert time.monotonic() < deadline, "the failure was never recorded"
                time.sleep(0.1)
            r = router.http.post("/v1/feedback", headers=auth, json={
                "decision_id": decision_id, "quality": 0.9, "event_id": "rating"})
            assert r.status_code == 409 and "the call failed" in r.json()["detail"], r.text
            deadline = time.monotonic() + 30
            while not (rows := conn.execute(
                    "SELECT event_id, quality FROM feedback WHERE decision_id = %s",
                    (decision_id,)).fetchall()):
                assert time.monotonic() < deadline, "the outcome was never stored"
                time.sleep(0.2)
    assert rows == [("gateway", 0.0)], rows
