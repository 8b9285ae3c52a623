"""The learner's pipeline (issue 17): the loop applies a batch to its in-memory
statistics while the writer thread still writes the previous one.

- Repeats of events applied in an EARLIER, committed batch reach the loop as fresh (it
  does not ask the database): the writer finds them in its transaction, applies only the
  fresh events to the statistics it reads back, and the loop re-applies its prepared
  next batch to those (fails without either step). The statistics still equal the
  replay of each event once.
- ``kill -9`` while a partition's transaction is open (its rows inserted, its statistics
  upsert blocked) and the next batch already applied in memory: the restarted learner
  ends with every event once.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from streams.learner import libpq_url
from tests.streams.helpers import (
    Ends,
    World,
    assert_feedback_rows,
    assert_same_statistics,
    load_statistics,
    producer,
    replay,
    send_events,
    stored_offsets,
    wait_caught_up,
)
from tests.streams.test_crash import _spawn, db  # noqa: F401 - the module's database
from tests.streams.test_learner import Running, start_learner  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def _first_events(url: str, bootstrap: str, topic: str, n: int) -> tuple:
    """A world with ``n`` decisions and one feedback event each, sent to ``topic``."""
    world = World(url, seed=int(time.time()))
    world.add_tenants(2)
    first = [world.feedback(d) for d in world.add_decisions(n)]
    prod, ends = producer(bootstrap), Ends()
    send_events(prod, topic, first, ends)
    return world, first, prod, ends


def test_repeats_of_committed_batches_applied_once(
        db: str, kafka_bootstrap: str, make_topic: Callable[..., str],  # noqa: F811
        unique_group_id: str, start_learner: Callable[..., Running]) -> None:  # noqa: F811
    topic = make_topic(partitions=1)
    world, first, prod, ends = _first_events(db, kafka_bootstrap, topic, 120)
    earlier = start_learner(topic, unique_group_id, max_poll_records=15)
    wait_caught_up(world.url, unique_group_id, topic, ends)
    # Then, with no learner running, a backlog of new events with a repeat of a first,
    # committed event every 20 (only the database knows those): a batch with a repeat is
    # corrected by the writer while the loop already applied the next batch, which has
    # none, to the uncorrected statistics.
    earlier.stop()
    fresh = [world.feedback(d) for d in world.add_decisions(240)]
    mixed = []
    for i, event in enumerate(fresh):
        mixed.append(event)
        if i % 20 == 7:
            mixed.append(first[i // 20])
    send_events(prod, topic, mixed, ends)
    learner = start_learner(topic, unique_group_id, max_poll_records=15)
    wait_caught_up(world.url, unique_group_id, topic, ends)
    learner.stop()
    metrics = learner.learner.metrics.events
    assert metrics.labels("applied")._value.get() == 240
    assert metrics.labels("duplicate")._value.get() == 12
    assert_same_statistics(load_statistics(world.url, unique_group_id, topic),
                           replay(world, first + fresh))
    assert_feedback_rows(world.url, first + fresh)


def _writer_waiting(url: str) -> bool:
    """A session of the database waits for a lock (the learner's writer, on ours)."""
    with psycopg.connect(libpq_url(url)) as conn:
        return bool(conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO partition_statistics%'"
        ).fetchone()[0])


def test_kill_9_inside_the_write_with_next_batch_prepared(
        db: str, kafka_bootstrap: str, make_topic: Callable[..., str],  # noqa: F811
        unique_group_id: str, tmp_path: Path) -> None:
    topic = make_topic(partitions=1)
    world, first, prod, ends = _first_events(db, kafka_bootstrap, topic, 60)
    log = tmp_path / "learner.log"
    proc = _spawn(db, kafka_bootstrap, topic, unique_group_id, log)
    try:
        wait_caught_up(world.url, unique_group_id, topic, ends)
        before = stored_offsets(world.url, unique_group_id, topic)
        # Hold the partition's statistics rows: the next write inserts its feedback rows,
        # then waits on the upsert, inside its transaction; the loop meanwhile polls and
        # applies the next batch (max 60 records a poll) to its statistics.
        with psycopg.connect(libpq_url(world.url)) as lock:
            lock.execute("SELECT 1 FROM partition_statistics WHERE group_id = %s"
                         " AND topic = %s FOR UPDATE", (unique_group_id, topic))
            later = [world.feedback(d) for d in world.add_decisions(200)]
            later += later[:30]  # repeats, applied once
            send_events(prod, topic, later, ends)
            deadline = time.monotonic() + 30
            while not _writer_waiting(world.url):
                assert time.monotonic() < deadline, "the writer never reached the upsert"
                time.sleep(0.05)
            time.sleep(1.0)  # the loop prepares the next batch and waits for the writer
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            lock.rollback()
        # Nothing of the killed transaction is there: same offset, no feedback row.
        assert stored_offsets(world.url, unique_group_id, topic) == before
        with world.conn() as conn:
            rows = conn.execute("SELECT count(*) FROM feedback WHERE decision_id = ANY(%s)",
                                ([e.decision_id for e in later],)).fetchone()[0]
        assert rows == 0
        proc = _spawn(db, kafka_bootstrap, topic, unique_group_id, log)
        wait_caught_up(world.url, unique_group_id, topic, ends, timeout_s=60)
    finally:
        proc.kill()
        proc.wait(10)
    expected = first + later[:200]
    assert_same_statistics(load_statistics(world.url, unique_group_id, topic),
                           replay(world, expected))
    assert_feedback_rows(world.url, expected)
