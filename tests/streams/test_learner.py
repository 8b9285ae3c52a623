"""Learners against the real broker and PostgreSQL: sharing, duplicates, poison, rebalance."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from kafka import KafkaConsumer

from service.db.engine import upgrade
from streams.config import StreamsConfig
from streams.learner import Learner
from streams.schemas import decode_dead_letter
from tests.streams.helpers import (
    DIM,
    Ends,
    World,
    assert_feedback_rows,
    assert_same_selection,
    assert_same_statistics,
    load_statistics,
    producer,
    replay,
    replay_partitions,
    send_events,
    send_raw,
    wait_caught_up,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def db(fresh_database_url: str) -> str:
    upgrade(fresh_database_url)
    return fresh_database_url


@pytest.fixture
def world(db: str) -> World:
    w = World(db, seed=int(time.time()))
    w.add_tenants(3)
    return w


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Running:
    """A learner looping in a thread (the real loop, stopped through its run flag)."""

    def __init__(self, learner: Learner) -> None:
        self.learner = learner
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.learner.run()
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self) -> None:
        self.learner.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "learner did not stop within 30 s"
        if self.error is not None:
            raise self.error


@pytest.fixture
def start_learner(db: str, kafka_bootstrap: str) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def _start(topic: str, group: str, dead_topic: str = "unused-dead", **kw: object) -> Running:
        config = StreamsConfig(bootstrap=kafka_bootstrap, feedback_topic=topic,
                               dead_letter_topic=dead_topic, group_id=group, dim=DIM, **kw)
        learner = Learner(config, db, client_id=f"test-{len(running)}")
        learner.start(create_topics=False)
        r = Running(learner)
        running.append(r)
        return r

    yield _start
    for r in running:
        if r.thread.is_alive():
            r.learner.stop()
            r.thread.join(30)


def test_apply_feedback_two_learners_equal_replay(world: World, kafka_bootstrap: str,
                                                  make_topic: Callable[..., str],
                                                  unique_group_id: str,
                                                  start_learner: Callable[..., Running]) -> None:
    topic = make_topic(partitions=4)
    ids = world.add_decisions(600)
    events = [world.feedback(d) for d in ids for _ in range(2)]
    events += events[:150]  # exact repeats: counted once
    a = start_learner(topic, unique_group_id, max_poll_records=200)
    b = start_learner(topic, unique_group_id, max_poll_records=200)
    prod, ends = producer(kafka_bootstrap), Ends()
    send_events(prod, topic, events, ends)
    wait_caught_up(world.url, unique_group_id, topic, ends)
    a.stop()
    b.stop()
    owned = a.learner.metrics.events.labels("applied")._value.get() + \
        b.learner.metrics.events.labels("applied")._value.get()
    assert owned == 1200
    total = load_statistics(world.url, unique_group_id, topic)
    assert_same_statistics(total, replay(world, events))
    assert_same_selection(total, replay_partitions(world, ends))
    assert_feedback_rows(world.url, events)
    # Each decision is charged the real cost of its last applied feedback (the second
    # event; the repeats of first events changed nothing), as in embedded mode.
    with world.conn() as conn:
        charged = dict(conn.execute("SELECT id, charged_usd FROM decisions"
                                    " WHERE id = ANY(%s)", (ids,)).fetchall())
    assert charged == {d: pytest.approx(events[2 * i + 1].cost_usd, abs=1e-15)
                       for i, d in enumerate(ids)}


def test_apply_feedback_poison_and_duplicates_dead_lettered(
        world: World, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str, start_learner: Callable[..., Running]) -> None:
    from datetime import timedelta

    topic, dead_topic = make_topic(partitions=2), make_topic(partitions=1)
    good = world.add_decisions(50)
    old = world.add_decisions(1, age=timedelta(days=60))[0]
    late = world.add_decisions(1, store=False)[0]
    never = world.add_decisions(1, store=False)[0]
    other = world.add_tenants(1)[0]
    events = [world.feedback(d) for d in good]
    prod, ends = producer(kafka_bootstrap), Ends()
    send_events(prod, topic, events[:25], ends)
    poison = {
        b"not json at all": "malformed-json",
        b'{"schema_version": 1, "event_id": "x", "decision_id": "' + good[0].encode()
        + b'", "tenant_id": "t", "quality": 7}': "out-of-range",
        b'{"schema_version": 9}': "invalid-event",
    }
    for raw in poison:
        send_raw(prod, topic, good[0].encode(), raw, ends)
    from streams.schemas import encode_feedback

    specials = {
        "decision-expired": world.feedback(old),
        "tenant-mismatch": world.feedback(good[1], tenant=other),
        "unknown-decision": world.feedback(never),
    }
    late_event = world.feedback(late)
    send_events(prod, topic, [*specials.values(), late_event, *events[25:], *events[:10]],
                ends)  # the last 10 are repeats
    port = _free_port()
    learner = start_learner(topic, unique_group_id, dead_topic=dead_topic,
                            pending_timeout_s=4.0, max_poll_records=50, metrics_port=port)
    time.sleep(1.5)
    world.store_later(late)  # its feedback waited in the pending buffer
    wait_caught_up(world.url, unique_group_id, topic, ends, timeout_s=30)
    time.sleep(0.6)  # one more (empty) poll: the lag gauges see the last write
    metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    learner.stop()
    assert 'bandit_learner_dead_letters_total{reason="unknown-decision"} 1.0' in metrics
    assert 'bandit_learner_events_total{outcome="applied"} 51.0' in metrics
    assert 'bandit_learner_events_total{outcome="duplicate"} 10.0' in metrics
    assert 'bandit_learner_lag{partition="0"} 0.0' in metrics
    expected = events + [late_event]
    assert_same_statistics(load_statistics(world.url, unique_group_id, topic),
                           replay(world, expected))
    # Only applied events are feedback: not the other tenant's on good[1], nor poison.
    assert_feedback_rows(world.url, expected)

    consumer = KafkaConsumer(dead_topic, bootstrap_servers=kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    letters = [decode_dead_letter(r.value) for r in consumer]
    consumer.close()
    by_reason: dict[str, list] = {}
    for letter in letters:
        by_reason.setdefault(letter.reason, []).append(letter)
    assert sorted(by_reason) == sorted({*poison.values(), *specials})
    for raw, reason in poison.items():
        assert [letter.original for letter in by_reason[reason]] == [raw]
    malformed = by_reason["out-of-range"][0]
    assert malformed.detail.startswith("quality: ")
    assert malformed.topic == topic and malformed.offset >= 0
    assert by_reason["unknown-decision"][0].original == encode_feedback(
        specials["unknown-decision"])


def test_apply_feedback_rows_toggled_each_event_once(
        world: World, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str, start_learner: Callable[..., Running]) -> None:
    """The group's key of an event is its feedback row (feedback_rows on) or its
    learner_applied row (off): a learner restarted with the other setting still skips
    the events applied under the first, and writes each key in one place only."""
    topic = make_topic(partitions=2)
    first, second, third = (world.add_decisions(40) for _ in range(3))
    phases = [(False, [world.feedback(d) for d in first]),
              (True, [world.feedback(d) for d in second]),
              (False, [world.feedback(d) for d in third])]
    prod, ends = producer(kafka_bootstrap), Ends()
    sent: list = []
    counts = []
    for feedback_rows, fresh in phases:
        # Every earlier event again (repeats across the switch), then the new ones.
        send_events(prod, topic, [*sent, *fresh], ends)
        sent += fresh
        learner = start_learner(topic, unique_group_id, feedback_rows=feedback_rows,
                                max_poll_records=30)
        wait_caught_up(world.url, unique_group_id, topic, ends)
        learner.stop()
        m = learner.learner.metrics.events
        counts.append((m.labels("applied")._value.get(), m.labels("duplicate")._value.get()))
    assert counts == [(40, 0), (40, 40), (40, 80)]
    assert_same_statistics(load_statistics(world.url, unique_group_id, topic),
                           replay(world, sent))
    with world.conn() as conn:
        keys = conn.execute("SELECT decision_id FROM learner_applied WHERE group_id = %s",
                            (unique_group_id,)).fetchall()
        rows = conn.execute("SELECT decision_id FROM feedback WHERE learner_group = %s",
                            (unique_group_id,)).fetchall()
    # Rows off: a key per event; rows on: the row is the key, no learner_applied row.
    assert sorted(d for (d,) in keys) == sorted([*first, *third])
    assert sorted(d for (d,) in rows) == sorted(second)


def test_reconcile_spend_cost_equal_to_charge_writes_no_row_version(
        world: World, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str, start_learner: Callable[..., Running]) -> None:
    """A reported cost equal to the decision's charge (a gateway that charged the real
    cost, a re-sent event) leaves the decision's row as it was (no new row version:
    its ``xmin`` stays); a different cost is written, as before."""
    from dataclasses import replace

    topic = make_topic(partitions=2)
    same, other = world.add_decisions(20), world.add_decisions(20)
    events = [world.feedback(d) for d in [*same, *other]]
    with world.conn() as conn:
        conn.cursor().executemany("UPDATE decisions SET charged_usd = %s WHERE id = %s",
                                  [(e.cost_usd, e.decision_id) for e in events[:20]])
        before = dict(conn.execute("SELECT id, xmin::text FROM decisions WHERE id = ANY(%s)",
                                   (same + other,)).fetchall())
    # A second event of each "same" decision repeats its cost: nothing to write either.
    events += [replace(e, event_id=e.event_id + "-again") for e in events[:20]]
    r = start_learner(topic, unique_group_id)
    prod, ends = producer(kafka_bootstrap), Ends()
    send_events(prod, topic, events, ends)
    wait_caught_up(world.url, unique_group_id, topic, ends)
    r.stop()
    with world.conn() as conn:
        after = {d: (x, c) for d, x, c in conn.execute(
            "SELECT id, xmin::text, charged_usd FROM decisions WHERE id = ANY(%s)",
            (same + other,)).fetchall()}
        rows = conn.execute("SELECT count(*) FROM feedback WHERE decision_id = ANY(%s)",
                            (same + other,)).fetchone()[0]
    assert rows == 60  # every event applied
    cost = {e.decision_id: e.cost_usd for e in events[20:40]}
    cost.update({e.decision_id: e.cost_usd for e in events[:20]})
    assert {d: c for d, (_x, c) in after.items()} == {
        d: pytest.approx(cost[d], abs=1e-15) for d in same + other}
    assert [d for d in same if after[d][0] != before[d]] == []
    assert [d for d in other if after[d][0] == before[d]] == []


def test_apply_feedback_learns_price_correction_like_embedded(
        world: World, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str, start_learner: Callable[..., Running]) -> None:
    """A reported cost over the price estimate the decision used (its ``predictions``)
    teaches the model's price correction, as the embedded mode's ``update(...,
    cost_estimate=)`` does; decisions without an estimate teach none."""
    topic = make_topic(partitions=3)
    priced = world.add_decisions(120, priced=True)
    plain = world.add_decisions(40)
    events = [world.feedback(d) for d in [*priced, *plain]]
    a = start_learner(topic, unique_group_id, max_poll_records=50)
    b = start_learner(topic, unique_group_id, max_poll_records=50)
    prod, ends = producer(kafka_bootstrap), Ends()
    send_events(prod, topic, events, ends)
    wait_caught_up(world.url, unique_group_id, topic, ends)
    a.stop()
    b.stop()
    stats = load_statistics(world.url, unique_group_id, topic)
    # Equal to a replay with the estimates, the price sums included.
    assert_same_statistics(stats, replay(world, events))
    # The ratio sums' weights count exactly the priced events of each model.
    ratios = stats._stats.price_ratio  # noqa: SLF001 - the sums under test
    for model in stats.arms:
        n = sum(1 for d in priced if world.decisions[d][1] == model)
        assert ratios[stats._index[model]][1] == pytest.approx(n), model  # noqa: SLF001


def test_bad_contexts_dead_lettered_the_batch_applied(
        world: World, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str, start_learner: Callable[..., Running]) -> None:
    """Decisions whose context has another dimension or values past the bound, among
    good ones of the same batch (one query returns them all): their feedback is
    dead-lettered with the reason and the field, the rest applied as a replay."""
    import numpy as np

    topic, dead_topic = make_topic(partitions=2), make_topic(partitions=1)
    good = world.add_decisions(30)
    tenant = world.tenants[0]
    short, huge = "short-context-decision", "huge-context-decision"
    bad_x = {short: world.rng.normal(size=world.dim - 3),
             huge: np.r_[world.rng.normal(size=world.dim - 1), 1e6]}
    for d, x in bad_x.items():
        world.decisions[d] = (tenant, "model-0", "shared", x)
    world.store([(d, tenant, "model-0", "shared", x) for d, x in bad_x.items()])
    events = [world.feedback(d) for d in good]
    bad = {d: world.feedback(d) for d in bad_x}
    prod, ends = producer(kafka_bootstrap), Ends()
    send_events(prod, topic, [*events[:15], *bad.values(), *events[15:]], ends)
    learner = start_learner(topic, unique_group_id, dead_topic=dead_topic)
    wait_caught_up(world.url, unique_group_id, topic, ends, timeout_s=30)
    learner.stop()
    assert_same_statistics(load_statistics(world.url, unique_group_id, topic),
                           replay(world, events))
    assert_feedback_rows(world.url, events)
    consumer = KafkaConsumer(dead_topic, bootstrap_servers=kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    letters = {decode_dead_letter(r.value).original: decode_dead_letter(r.value)
               for r in consumer}
    consumer.close()
    from streams.schemas import encode_feedback

    assert len(letters) == 2
    too_few = letters[encode_feedback(bad[short])]
    assert too_few.reason == "invalid-event"
    assert too_few.detail == (f"context: the decision's context has {world.dim - 3} "
                              f"dimensions, the learner {world.dim}")
    too_big = letters[encode_feedback(bad[huge])]
    assert too_big.reason == "invalid-event"
    assert too_big.detail.startswith("context: the decision's context has values outside")
