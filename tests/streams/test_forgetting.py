"""Forgetting in distributed mode against the real broker and PostgreSQL: feedback on old
and new decisions through two learners, then the decider's snapshot."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient
from kafka import TopicPartition

from bandit import LinUCB, Policy
from service.app import create_app
from service.config import Settings
from service.distributed import StatisticsFollower, streams_config
from streams.learner import Learner
from streams.schemas import FeedbackEvent
from streams.stats import SHARED_KEY, HalfLifeMismatchError
from tests.service.conftest import ADMIN_KEY, add_model
from tests.streams.helpers import (
    DIM,
    MODELS,
    Ends,
    World,
    assert_same_statistics,
    producer,
    send_events,
    stored_offsets,
    wait_caught_up,
)
from tests.streams.test_learner import Running

pytestmark = pytest.mark.integration

HALF_LIFE = 24.0
CHANGED = MODELS[0]
# (hours ago, decisions): many old ones, when CHANGED was good, fewer recent ones after
# its provider swapped it for a worse model.
AGES = [(240, 150), (168, 150), (96, 150), (48, 40), (24, 40), (6, 40), (1, 40), (0, 40)]
SWAP_H = 72


def test_route_forgetting_distributed_snapshot_equals_embedded_policy(
        fresh_database_url: str, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str) -> None:
    topic = make_topic(partitions=3)
    settings = Settings(database_url=fresh_database_url, admin_key=ADMIN_KEY, dim=DIM,
                        policy_seed=3, kafka_bootstrap=kafka_bootstrap,
                        feedback_topic=topic, decisions_topic=make_topic(partitions=1),
                        dead_letter_topic=make_topic(partitions=1),
                        learner_group=unique_group_id, snapshot_poll_interval_s=0.5,
                        half_life_hours=HALF_LIFE)
    # The learners take the half-life from the same settings (as `bandit-router learn`).
    config = replace(streams_config(settings), max_poll_records=50, metrics_port=0)
    assert config.half_life_hours == HALF_LIFE
    with TestClient(create_app(settings)) as client:
        routing = client.app.state.routing
        for name in MODELS:
            add_model(client, name)
        world = World(fresh_database_url, seed=int(time.time()))
        world.add_tenants(2)
        created: dict[str, float] = {}
        for hours, n in AGES:
            ids = world.add_decisions(n, age=timedelta(hours=hours))
            with world.conn() as conn:
                created.update({d: at.timestamp() for d, at in conn.execute(
                    "SELECT id, created_at FROM decisions WHERE id = ANY(%s)", (ids,))})
        rng = np.random.default_rng(world.seed)
        events = []
        for d, at in created.items():
            tenant, model, _scope, _x = world.decisions[d]
            if model == CHANGED:
                quality = 0.9 if at < time.time() - SWAP_H * 3600.0 else 0.1
            else:
                quality = float(rng.uniform(0.3, 0.7))
            events.append(FeedbackEvent("", d, tenant, quality=quality,
                                        cost_usd=float(rng.uniform(0, 0.01)),
                                        latency_ms=float(rng.uniform(50, 2000))))
        events = [events[i] for i in rng.permutation(len(events))]  # not in time order

        learners = [Learner(config, fresh_database_url, client_id=f"forget-{i}")
                    for i in range(2)]
        for learner in learners:
            learner.start(create_topics=False)
        running = [Running(learner) for learner in learners]
        try:
            ends = Ends()
            send_events(producer(kafka_bootstrap), topic, events, ends)
            wait_caught_up(fresh_database_url, unique_group_id, topic, ends)
        finally:
            for r in running:
                r.stop()
        applied = sum(r.learner.metrics.events.labels("applied")._value.get()
                      for r in running)
        assert applied == len(events)
        stored = stored_offsets(fresh_database_url, unique_group_id, topic)
        # A learner without forgetting that started before anything was stored (its
        # start-up check is skipped here: the race it cannot see) and is then assigned a
        # partition refuses its statistics and stops with the error, because kafka-python
        # only logs a rebalance listener's exception. The listener's method is called
        # directly: with the test broker (Tansu), a member that joined after every other
        # member had left was not assigned anything within 60 s (its JoinGroup waited).
        late = Learner(replace(config, half_life_hours=None), fresh_database_url,
                       client_id="forget-late")
        with pytest.raises(HalfLifeMismatchError):
            late._check_stored_statistics()  # noqa: SLF001
        late._check_stored_statistics = lambda: None  # type: ignore[method-assign]
        late.start(create_topics=False)
        try:
            late._assign([TopicPartition(topic, p) for p in sorted(stored)])  # noqa: SLF001
            assert not late.running and late.partitions == {}
            with pytest.raises(HalfLifeMismatchError, match="BANDIT_ROUTER_HALF_LIFE_HOURS"):
                late.step(timeout_ms=100)
        finally:
            late.close()
        assert stored_offsets(fresh_database_url, unique_group_id, topic) == stored
        deadline = time.monotonic() + 30
        while routing.statistics.snapshot_offsets != stored:
            assert time.monotonic() < deadline, (routing.statistics.snapshot_offsets, stored)
            time.sleep(0.2)
        with routing.policies.lock:  # noqa: SLF001 - the snapshot under test
            snapshot = dict(routing.shared)

        # The embedded mode's policy (the same builder, the same setting) fed every event
        # once, in event-time order, then forgotten to the snapshot's reference time.
        reference_time = snapshot["linucb"].reference_time
        assert reference_time is not None
        assert reference_time >= max(created.values())
        built = routing.policies.new_policy("linucb")  # noqa: SLF001
        assert built.config.half_life_hours == HALF_LIFE
        # Drift detection stays off in distributed mode (it depends on event order).
        embedded = Policy.from_bytes(built.to_bytes(), drift_delta=None)
        plain = LinUCB(DIM, seed=0, drift_delta=None)  # no forgetting, for contrast
        for name in MODELS:
            plain.add_arm(name)
        for event in sorted(events, key=lambda e: created[e.decision_id]):
            _tenant, model, _scope, x = world.decisions[event.decision_id]
            embedded.update(model, x, event.outcome(), now=created[event.decision_id])
            plain.update(model, x, event.outcome())
        embedded.decay(reference_time)
        for kind in ("linucb", "thompson"):
            assert snapshot[kind].reference_time == reference_time
            assert_same_statistics(snapshot[kind], embedded)
        x0 = np.zeros(DIM)
        got, want = snapshot["linucb"].predict(x0), embedded.predict(x0)
        for name in MODELS:
            assert got[name].quality == pytest.approx(want[name].quality, abs=1e-9)
            assert got[name].cost_usd == pytest.approx(want[name].cost_usd, abs=1e-9)
        # The swapped model is re-learned: its recent level, not the average of its past.
        assert got[CHANGED].quality < 0.3
        assert plain.predict(x0)[CHANGED].quality > 0.5

        # An idle stream keeps forgetting: the same sums, published again a day later.
        clock = [reference_time]
        published: list[dict] = []
        follower = StatisticsFollower(fresh_database_url, config,
                                      lambda totals, _offsets: published.append(totals),
                                      decay_interval_s=60.0, clock=lambda: clock[0])
        assert follower.refresh() is True
        assert follower.refresh() is False  # nothing changed, no time passed
        clock[0] += 2 * HALF_LIFE * 3600.0
        assert follower.refresh() is True
        first, later = published[0][SHARED_KEY], published[1][SHARED_KEY]
        assert later.reference_time == clock[0]
        np.testing.assert_allclose(later._stats.weight,  # noqa: SLF001
                                   first._stats.weight / 4.0, rtol=1e-12)  # noqa: SLF001
        decider = routing.statistics.snapshot("linucb", later)  # noqa: SLF001
        np.testing.assert_array_equal(decider._stats.mu0,  # noqa: SLF001
                                      routing.policies.new_policy("linucb")._stats.mu0)  # noqa: SLF001

    # Another half-life on a learner or a decider is refused, naming the setting.
    other = Learner(replace(config, half_life_hours=None), fresh_database_url)
    try:
        with pytest.raises(HalfLifeMismatchError, match="BANDIT_ROUTER_HALF_LIFE_HOURS"):
            other.start(create_topics=False)
    finally:
        other.close()
    wrong = StatisticsFollower(fresh_database_url, replace(config, half_life_hours=12.0),
                               lambda *_: None)
    with pytest.raises(HalfLifeMismatchError, match="learned with 24.0"):
        wrong.refresh()
    assert wrong.error is not None and "BANDIT_ROUTER_HALF_LIFE_HOURS" in wrong.error
