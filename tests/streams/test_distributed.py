"""Distributed mode end to end: two API replicas, Kafka feedback, one learner."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from kafka import KafkaConsumer

from bandit import Preferences, SelectiveThompson
from service.app import create_app
from service.config import DEFAULT_POLICY
from service.db.engine import upgrade
from service.domain import POLICY_KINDS
from streams.config import StreamsConfig
from streams.learner import Learner, libpq_url
from streams.schemas import decode_decision
from tests.service.conftest import (
    ADMIN,
    ADMIN_KEY,
    add_model,
    create_tenant,
    decide,
    embedding,
)
from tests.streams.helpers import DIM
from tests.streams.test_learner import Running

pytestmark = pytest.mark.integration


def test_route_feedback_through_kafka_visible_to_both_replicas(
        fresh_database_url: str, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str) -> None:
    feedback_topic, decisions_topic = make_topic(partitions=3), make_topic(partitions=2)
    dead_topic = make_topic(partitions=1)
    settings = {"database_url": fresh_database_url, "admin_key": ADMIN_KEY, "dim": DIM,
                "policy_seed": 3, "kafka_bootstrap": kafka_bootstrap,
                "feedback_topic": feedback_topic, "decisions_topic": decisions_topic,
                "dead_letter_topic": dead_topic, "learner_group": unique_group_id,
                "snapshot_poll_interval_s": 0.5}
    from service.config import Settings

    with TestClient(create_app(Settings(**settings))) as a:
        models = [add_model(a, f"dist-{i}") for i in range(3)]
        tenant = create_tenant(a)
        with TestClient(create_app(Settings(**settings))) as b:
            decided = []
            for seed in range(30):
                r = decide(a, tenant, seed=seed)
                assert r.status_code == 200, r.text
                decided.append(r.json())
            for i, d in enumerate(decided):
                body = {"decision_id": d["decision_id"], "quality": 0.9, "latency_ms": 300,
                        "event_id": f"e{i}"}
                r = b.post("/v1/feedback", json=body, headers=tenant)
                assert r.status_code == 202, r.text
                assert r.json() == {"status": "queued", "decision_id": d["decision_id"],
                                    "event_id": f"e{i}"}
            # A repeat is accepted by the API and skipped by the learner.
            r = b.post("/v1/feedback", json=body, headers=tenant)
            assert r.status_code == 202 and r.json()["status"] == "queued"

            config = StreamsConfig(bootstrap=kafka_bootstrap, feedback_topic=feedback_topic,
                                   dead_letter_topic=dead_topic, group_id=unique_group_id,
                                   dim=DIM)
            learner = Learner(config, fresh_database_url)
            learner.start(create_topics=False)
            running = Running(learner)
            try:
                expected = Counter(d["model"] for d in decided)
                deadline = time.monotonic() + 45
                while True:
                    seen = [{m: app.app.state.routing.shared[kind].observations(m)["quality"]
                             for m in models}
                            for app in (a, b) for kind in POLICY_KINDS]
                    if all(s == {m: expected.get(m, 0) for m in models} for s in seen):
                        break
                    assert time.monotonic() < deadline, (seen, dict(expected))
                    time.sleep(0.2)
            finally:
                running.stop()
            # The default kind decided. Rebuilt from the learners' sums (no prequential
            # errors), select has every model on its mean (docs/streams.md, "Deciders").
            assert {d["policy"] for d in decided} == {DEFAULT_POLICY} == {"select"}
            probes = [np.asarray(embedding(seed)) for seed in (101, 102)]
            for app in (a, b):
                policy = app.app.state.routing.shared["select"]
                assert isinstance(policy, SelectiveThompson)
                first, second = (policy.predict(x, Preferences(), models) for x in probes)
                for m in models:
                    assert first[m].quality == pytest.approx(second[m].quality, abs=1e-6)
                    if expected.get(m):  # learned: toward the 0.9 every outcome reported
                        assert first[m].quality > 0.6, (m, first[m].quality)
            assert learner.metrics.events.labels("duplicate")._value.get() == 1

    consumer = KafkaConsumer(decisions_topic, bootstrap_servers=kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    published = {decode_decision(r.value).decision_id: decode_decision(r.value)
                 for r in consumer}
    consumer.close()
    assert set(published) == {d["decision_id"] for d in decided}
    one = published[decided[0]["decision_id"]]
    assert len(one.context) == DIM and one.model == decided[0]["model"]
    assert one.propensity == pytest.approx(decided[0]["propensity"])


def test_route_guard_counts_outcomes_learned_through_kafka(
        fresh_database_url: str, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str) -> None:
    """The learners write the guard's part of each guarded decision's outcome, as the
    embedded ingest does, and the replica's guard account counts it (live, and rebuilt
    after a restart); feedback in two events is merged and counted once."""
    from service.config import Settings

    topic = make_topic(partitions=2)
    settings = Settings(database_url=fresh_database_url, admin_key=ADMIN_KEY, dim=DIM,
                        policy_seed=3, kafka_bootstrap=kafka_bootstrap, feedback_topic=topic,
                        decisions_topic=make_topic(partitions=1),
                        dead_letter_topic=make_topic(partitions=1),
                        learner_group=unique_group_id, snapshot_poll_interval_s=0.5)
    config = StreamsConfig(bootstrap=kafka_bootstrap, feedback_topic=topic,
                           dead_letter_topic=settings.dead_letter_topic,
                           group_id=unique_group_id, dim=DIM)
    upgrade(fresh_database_url)
    learner = Learner(config, fresh_database_url)
    learner.start(create_topics=False)
    running = Running(learner)
    try:
        with TestClient(create_app(settings)) as client:
            for name in ("g-a", "g-b"):
                add_model(client, name)
            tenant = create_tenant(client)
            r = client.put("/v1/admin/tenants/" + tenant["X-Tenant"] + "/preferences",
                           json={"baseline_model": "g-a", "max_exploration_loss": 0.03,
                                 "weights": {"quality": 1.0, "cost": 100.0,
                                             "latency": 0.0}},
                           headers=ADMIN)
            assert r.status_code == 200, r.text
            answered = []
            for i in range(12):
                d = decide(client, tenant, seed=i).json()
                if i % 2 == 0:
                    answered.append(d["decision_id"])
                    for event, outcome in (("q", {"quality": 0.6}), ("c", {"cost_usd": 0.001})):
                        r = client.post("/v1/feedback", json={
                            "decision_id": d["decision_id"], "event_id": event, **outcome},
                            headers=tenant)
                        assert r.status_code == 202, r.text
            state = client.app.state.routing.tenants[tenant["X-Tenant"]]
            deadline = time.monotonic() + 45
            while state.guard_state.value_rounds < len(answered):
                assert time.monotonic() < deadline, state.guard_state
                time.sleep(0.2)
            live = state.guard_state.to_dict()
            with psycopg.connect(libpq_url(fresh_database_url)) as conn:
                stored = dict(conn.execute("SELECT id, guard FROM decisions WHERE id = ANY(%s)",
                                           (answered,)).fetchall())
    finally:
        running.stop()
    assert live["rounds"] == 12 and live["value_rounds"] == 6 and live["residuals"] == 6
    for guard in stored.values():
        assert guard["outcome"] == {"quality": 0.6, "cost_usd": 0.001}
        assert guard["reward"] == pytest.approx(0.6 - 100.0 * 0.001, abs=1e-12)
    # A restarted replica rebuilds the same account from the decision log.
    with TestClient(create_app(settings)) as client:
        restored = client.app.state.routing.tenants[tenant["X-Tenant"]].guard_state.to_dict()
    assert restored == pytest.approx(live)
