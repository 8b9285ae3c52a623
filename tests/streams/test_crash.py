"""Crashes and rebalances under load: the statistics still equal the clean replay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from service.db.engine import upgrade
from streams.config import StreamsConfig
from streams.learner import Learner
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
    stored_offsets,
    wait_caught_up,
)
from tests.streams.test_learner import Running

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def db(fresh_database_url: str) -> str:
    upgrade(fresh_database_url)
    return fresh_database_url


class Load:
    """Produces feedback (with repeats) in the background until stopped."""

    def __init__(self, world: World, bootstrap: str, topic: str, per_tick: int = 40,
                 max_age_h: float = 0.0) -> None:
        self.world, self.topic, self.per_tick = world, topic, per_tick
        # Decisions of a tick are that many hours old (at random): events out of time order.
        self.max_age_h = max_age_h
        self.rng = np.random.default_rng(world.seed)
        self.prod = producer(bootstrap)
        self.ends = Ends()
        self.events: list = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def tick(self) -> None:
        age = timedelta(hours=float(self.rng.uniform(0.0, self.max_age_h)))
        ids = self.world.add_decisions(self.per_tick, age=age)
        batch = [self.world.feedback(d) for d in ids]
        batch += batch[: self.per_tick // 8]  # repeats
        send_events(self.prod, self.topic, batch, self.ends)
        self.events.extend(batch)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.tick()
            time.sleep(0.05)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(30)


def _spawn(db: str, bootstrap: str, topic: str, group: str, log: Path,
           half_life_hours: float | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    forgetting = [] if half_life_hours is None else ["--half-life-hours", str(half_life_hours)]
    return subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "streams.learner", "--bootstrap", bootstrap,
         "--database-url", db, "--feedback-topic", topic, "--group-id", group,
         "--dim", str(DIM), "--max-poll-records", "60", "--no-create-topics", *forgetting],
        env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT)


def _wait_progress(db: str, group: str, topic: str, since: dict[int, int],
                   timeout_s: float = 40.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = stored_offsets(db, group, topic)
        if any(now.get(p, -1) > since.get(p, -1) for p in now):
            return
        time.sleep(0.1)
    raise AssertionError(f"no learner progress in {timeout_s}s")


# With forgetting, a re-read after a kill must weigh an event exactly as the first read
# did: event time is the decision's created_at (here up to ten days old, out of order).
@pytest.mark.parametrize(("half_life", "max_age_h"), [(None, 0.0), (24.0, 240.0)])
def test_kill_learner_repeatedly_equal_replay(db: str, kafka_bootstrap: str,
                                              make_topic: Callable[..., str],
                                              unique_group_id: str, tmp_path: Path,
                                              half_life: float | None,
                                              max_age_h: float) -> None:
    world = World(db, seed=11)
    world.add_tenants(3)
    topic = make_topic(partitions=3)
    rng = np.random.default_rng(5)
    log = tmp_path / "learner.log"
    kills = 0
    with Load(world, kafka_bootstrap, topic, max_age_h=max_age_h) as load:
        for _ in range(4):
            before = stored_offsets(db, unique_group_id, topic)
            proc = _spawn(db, kafka_bootstrap, topic, unique_group_id, log, half_life)
            try:
                _wait_progress(db, unique_group_id, topic, before)
                # Mid-batch: batches of 60 records take milliseconds, so any instant
                # after progress lands inside or between writes at random.
                time.sleep(float(rng.uniform(0.05, 1.0)))
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
            kills += 1
    assert kills == 4
    proc = _spawn(db, kafka_bootstrap, topic, unique_group_id, log, half_life)
    try:
        wait_caught_up(db, unique_group_id, topic, load.ends, timeout_s=90)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"learner stopped after" in log.read_bytes()
    total = load_statistics(db, unique_group_id, topic, half_life_hours=half_life)
    assert_same_statistics(total, replay(world, load.events, half_life_hours=half_life))
    if half_life is None:
        # The select policy's prequential errors too: each event once, in its
        # partition's order, whatever the kills did.
        assert_same_selection(total, replay_partitions(world, load.ends))
    assert_feedback_rows(db, load.events)


def test_rebalance_under_load_equal_replay(db: str, kafka_bootstrap: str,
                                           make_topic: Callable[..., str],
                                           unique_group_id: str) -> None:
    world = World(db, seed=12)
    world.add_tenants(2)
    topic = make_topic(partitions=4)

    def start(name: str) -> Running:
        config = StreamsConfig(bootstrap=kafka_bootstrap, feedback_topic=topic,
                               group_id=unique_group_id, dim=DIM, max_poll_records=80)
        learner = Learner(config, db, client_id=name)
        learner.start(create_topics=False)
        return Running(learner)

    with Load(world, kafka_bootstrap, topic) as load:
        a = start("a")
        _wait_progress(db, unique_group_id, topic, {})
        b = start("b")  # joins: the group rebalances while events keep coming
        deadline = time.monotonic() + 30
        while not (a.learner.partitions and b.learner.partitions):
            assert time.monotonic() < deadline, "b never got partitions"
            time.sleep(0.1)
        a.stop()  # leaves: b takes every partition, still under load
        time.sleep(2.0)
    try:
        wait_caught_up(db, unique_group_id, topic, load.ends, timeout_s=60)
        assert len(b.learner.partitions) == 4
    finally:
        b.stop()
    total = load_statistics(db, unique_group_id, topic)
    assert_same_statistics(total, replay(world, load.events))
    assert_same_selection(total, replay_partitions(world, load.ends))
    assert_feedback_rows(db, load.events)
