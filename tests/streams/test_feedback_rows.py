"""Distributed mode shows a decision's feedback like embedded mode: the learner writes the
``feedback`` rows of the events it applies, once per (decision_id, event_id), in the
partition's transaction; dead letters never show up; replays add nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from streams.config import StreamsConfig
from streams.learner import Learner
from streams.schemas import FeedbackEvent, encode_feedback
from tests.service.conftest import ADMIN_KEY, add_model, create_tenant, decide, make_settings
from tests.streams.helpers import DIM, World, producer
from tests.streams.test_learner import Running

pytestmark = pytest.mark.integration

# (decision index, body of POST /v1/feedback without decision_id)
POSTS = [
    (0, {"event_id": "rating", "quality": 0.9, "latency_ms": 300.0}),
    (0, {"event_id": "billing", "cost_usd": 0.002}),
    (0, {"event_id": "rating", "quality": 0.1}),  # a repeat with other values: ignored
    (1, {"quality": 0.5}),  # the anonymous event
    (1, {"quality": 0.7, "latency_ms": 10.0}),  # anonymous again: a repeat
]


def _feedback(client: TestClient, headers: dict[str, str], decision_id: str) -> list[dict]:
    r = client.get(f"/v1/decisions/{decision_id}", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["feedback"]


def _values(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "received_at"} for row in rows]


def _row(event_id: str | None, quality: float | None = None, cost_usd: float | None = None,
         latency_ms: float | None = None) -> dict:
    return {"event_id": event_id, "quality": quality, "cost_usd": cost_usd,
            "latency_ms": latency_ms}


def _count(learner: Learner, outcome: str) -> int:
    return int(learner.metrics.events.labels(outcome)._value.get())


def _wait(what: str, done: Callable[[], bool], running: list[Running],
          timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        for r in running:
            if r.error is not None:  # the learner's loop died: its error, not a timeout
                raise r.error
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout_s} s"
        time.sleep(0.1)


def _embedded_feedback(tmp_path: Path) -> list[list[dict]]:
    """The same decisions and POSTs in embedded mode (SQLite): the feedback shown."""
    url = f"sqlite:///{tmp_path / 'embedded.db'}"
    with TestClient(create_app(make_settings(url))) as client:
        add_model(client, "emb-0")
        add_model(client, "emb-1")
        tenant = create_tenant(client)
        ids = []
        for seed in range(2):
            r = decide(client, tenant, seed=seed)
            assert r.status_code == 200, r.text
            ids.append(r.json()["decision_id"])
        statuses = []
        for index, body in POSTS:
            r = client.post("/v1/feedback", json={"decision_id": ids[index], **body},
                            headers=tenant)
            assert r.status_code == 202, r.text
            statuses.append(r.json()["status"])
        assert statuses == ["applied", "applied", "duplicate", "applied", "duplicate"]
        return [_feedback(client, tenant, d) for d in ids]


def test_get_decision_shows_applied_feedback_once_like_embedded(
        fresh_database_url: str, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str, tmp_path: Path) -> None:
    embedded = _embedded_feedback(tmp_path)
    topic, dead_topic = make_topic(partitions=2), make_topic(partitions=1)
    settings = Settings(database_url=fresh_database_url, admin_key=ADMIN_KEY, dim=DIM,
                        policy_seed=3, kafka_bootstrap=kafka_bootstrap, feedback_topic=topic,
                        decisions_topic=make_topic(partitions=1), dead_letter_topic=dead_topic,
                        learner_group=unique_group_id, snapshot_poll_interval_s=0.5)
    running: list[Running] = []

    def start(group: str) -> Learner:
        config = StreamsConfig(bootstrap=kafka_bootstrap, feedback_topic=topic,
                               dead_letter_topic=dead_topic, group_id=group, dim=DIM,
                               pending_timeout_s=600.0)
        learner = Learner(config, fresh_database_url, client_id=f"rows-{len(running)}")
        learner.start(create_topics=False)
        running.append(Running(learner))
        return learner

    with TestClient(create_app(settings)) as api:
        add_model(api, "dist-0")
        add_model(api, "dist-1")
        tenant, other = create_tenant(api, "owner"), create_tenant(api, "other")
        owner_id = tenant["X-Tenant"]
        ids = []
        for seed in range(3):
            r = decide(api, tenant, seed=seed)
            assert r.status_code == 200, r.text
            ids.append(r.json()["decision_id"])
        # Kafka timestamps have millisecond resolution.
        sent_from = time.time() - 1e-3
        for index, body in POSTS:
            r = api.post("/v1/feedback", json={"decision_id": ids[index], **body},
                         headers=tenant)
            assert r.status_code == 202, r.text
            assert r.json()["status"] == "queued"
        # Telemetry straight onto the topic: one event and its repeat, and three that
        # are dead-lettered (they must not show up as feedback, for anyone).
        telemetry = FeedbackEvent("tel-1", ids[2], owner_id, quality=0.6, cost_usd=0.003,
                                  latency_ms=1200.0, sent_at=time.time())
        poison = [
            b'{"schema_version": 1, "event_id": "cut", "decision_id": "' + ids[2].encode(),
            encode_feedback(FeedbackEvent("range", ids[2], owner_id, quality=0.5))
            .replace(b'"quality":0.5', b'"quality":7.0'),
            encode_feedback(FeedbackEvent("foreign", ids[2], other["X-Tenant"], quality=1.0)),
        ]
        assert b'"quality":7.0' in poison[1]
        prod = producer(kafka_bootstrap)
        for value in [encode_feedback(telemetry), *poison, encode_feedback(telemetry)]:
            prod.send(topic, key=ids[2].encode(), value=value).get(timeout=30)
        sent_to = time.time() + 1e-3
        # Queued, not applied yet: nothing to show.
        assert _feedback(api, tenant, ids[0]) == []

        first = start(unique_group_id)
        try:
            _wait("10 records taken", lambda: sum(_count(first, o) for o in (
                "applied", "duplicate", "dead_lettered")) == 10, running)
            assert [_count(first, o) for o in ("applied", "duplicate", "dead_lettered")] == \
                [4, 3, 3]

            shown = [_feedback(api, tenant, d) for d in ids]
            expected = [
                [_row("rating", quality=0.9, latency_ms=300.0),
                 _row("billing", cost_usd=0.002)],
                [_row(None, quality=0.5)],
                [_row("tel-1", quality=0.6, cost_usd=0.003, latency_ms=1200.0)],
            ]
            assert [_values(rows) for rows in shown] == expected
            # Same rows, values and order as embedded mode for the same POSTs.
            assert [_values(rows) for rows in shown[:2]] == [_values(r) for r in embedded]
            assert {tuple(sorted(row)) for rows in shown + embedded for row in rows} == \
                {("cost_usd", "event_id", "latency_ms", "quality", "received_at")}
            for row in (row for rows in shown for row in rows):
                # received_at: when the event reached the topic, as embedded mode's is
                # when the service received it (UTC)
                received = datetime.fromisoformat(row["received_at"].replace("Z", "+00:00"))
                assert received.utcoffset() == timedelta(0), row
                assert sent_from <= received.timestamp() <= sent_to, row
            r = api.get(f"/v1/decisions/{ids[2]}", headers=other)
            assert r.status_code == 404, r.text

            # Replay after a restart: an event waiting for its decision holds the
            # partition's stored offset back, so the events after it are read again.
            world = World(fresh_database_url, seed=1, tenants=[owner_id])
            late = world.add_decisions(1, store=False)[0]
            late_event = world.feedback(late, "late-1")
            meta = prod.send(topic, key=late.encode(),
                             value=encode_feedback(late_event)).get(timeout=30)
            after = FeedbackEvent("after-pending", ids[0], owner_id, quality=0.4)
            for event in (after, telemetry):  # on the pending event's partition
                prod.send(topic, partition=meta.partition, key=event.decision_id.encode(),
                          value=encode_feedback(event)).get(timeout=30)
            _wait("the two events after the pending one, which waits",
                  lambda: _count(first, "applied") == 5 and _count(first, "duplicate") == 4
                  and first.metrics.pending._value.get() == 1, running)
            running[0].stop()
            second = start(unique_group_id)
            _wait("the re-read events skipped", lambda: _count(second, "duplicate") == 2,
                  running)
            assert _count(second, "applied") == 0
            world.store_later(late)  # the pending event now applies, once
            _wait("the pending event applied", lambda: _count(second, "applied") == 1, running)
            running[1].stop()
            shown = [_feedback(api, tenant, d) for d in [*ids, late]]
            expected[0].append(_row("after-pending", quality=0.4))
            expected.append([_row("late-1", quality=late_event.quality,
                                  cost_usd=late_event.cost_usd,
                                  latency_ms=late_event.latency_ms)])
            assert [_values(rows) for rows in shown] == expected

            # A fresh consumer group re-reads the whole topic (e.g. after a change of the
            # partition count) and applies every event to its own statistics: the
            # history keeps one row per event, the first.
            third = start(f"{unique_group_id}-fresh")
            _wait("the fresh group's replay", lambda: _count(third, "applied") == 6, running)
            running[2].stop()
            assert [_count(third, o) for o in ("duplicate", "dead_lettered")] == [4, 3]
            assert [_feedback(api, tenant, d) for d in [*ids, late]] == shown
            with world.conn() as conn:
                rows = conn.execute("SELECT count(*), count(DISTINCT (decision_id, event_id))"
                                    " FROM feedback").fetchone()
            assert rows == (6, 6)
        finally:
            prod.close()
            for r in running:
                if r.thread.is_alive():
                    r.learner.stop()
                    r.thread.join(30)
