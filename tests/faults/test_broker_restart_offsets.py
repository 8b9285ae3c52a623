"""The Kafka-protocol broker killed and started again on persistent storage, under
running learners (``python -m streams.learner``): they resume at their stored offsets.

A private persistent broker: ``ops/kafka.sh`` with ``BANDIT_KAFKA_STORAGE=s3`` (Tansu on
a moto S3 server, both on free loopback ports, pid and log files in a private directory),
the private PostgreSQL cluster of ``conftest``. The scenario, once per module:

1. feedback is produced (with exact repeats) while two learners apply it;
2. the producer stops and the broker is SIGKILLed at once (the learners may be behind);
   the test checks that the process is gone and the port refuses connections;
3. the broker is started again on the same bucket; the topics and every record
   acknowledged before the kill are checked to be there, byte for byte, below the old
   end offsets;
4. one of the two learners is SIGKILLed while the broker is away and a new one is
   started after the restart (the group rebalances: the partitions are assigned again
   and the learners seek to the offsets stored in PostgreSQL); the other learner runs
   through the whole outage;
5. more feedback is produced (its offsets must continue after the old ends), the
   learners must catch up.

Checked: nothing skipped (every partition's stored offset reaches the end, the applied
count equals the distinct events), nothing applied or even read twice (the learners'
``duplicate`` count equals the repeats that were sent: a learner that re-read from an
earlier offset would count the re-read records as duplicates), and the statistics equal
the clean single-process replay to 1e-9 (``tests/streams/helpers.py``).

Skips only if the S3 server (PyPI ``moto[server]``) cannot be installed by
``ops/kafka.sh install-s3``; a missing Tansu binary is a failure, as elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from service.db.engine import upgrade
from streams.config import StreamsConfig
from streams.schemas import encode_feedback
from streams.topics import ensure_topics
from tests.faults.conftest import ROOT, PrivatePostgres, free_port
from tests.faults.test_broker_outage import tansu_binary
from tests.streams.helpers import (
    DIM,
    Ends,
    World,
    assert_same_statistics,
    load_statistics,
    replay,
    stored_offsets,
    wait_caught_up,
)
from tests.streams.test_crash import Load, _wait_progress

PARTITIONS = 3
GROUP = "restart-learners"
KAFKA_SH = ROOT / "ops" / "kafka.sh"


class PersistentBroker:
    """``ops/kafka.sh`` on private ports and files, with the s3 storage."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.port, self.s3_port = free_port(), free_port()
        self.env = {**os.environ, "BANDIT_KAFKA_STORAGE": "s3",
                    "BANDIT_KAFKA_PORT": str(self.port),
                    "BANDIT_KAFKA_S3_PORT": str(self.s3_port),
                    "BANDIT_KAFKA_RUN_DIR": str(run_dir), "BANDIT_KAFKA_TIMEOUT": "30"}

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def run(self, command: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(KAFKA_SH), command], env=self.env,  # noqa: S603
                              capture_output=True, text=True, timeout=timeout_s)

    def start(self) -> None:
        result = self.run("start")
        if result.returncode != 0:
            pytest.fail(f"ops/kafka.sh start (s3 storage) failed: {result.stdout[-1500:]}"
                        f" {result.stderr[-1500:]}", pytrace=False)

    @property
    def pid(self) -> int:
        return int((self.run_dir / "kafka.pid").read_text())

    def kill(self) -> float:
        """SIGKILL the broker; returns the seconds until it is gone and its port closed."""
        pid, started = self.pid, time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while _running(pid) or _listening(self.port):
            assert time.monotonic() - started < 10, f"broker pid {pid} still there after 10 s"
            time.sleep(0.05)
        return time.monotonic() - started


def _running(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _read_all(bootstrap: str, topic: str, ends: dict[int, int],
              timeout_s: float = 20.0) -> dict[tuple[int, int], tuple[bytes, bytes]]:
    """Every record of ``topic`` up to ``ends``: (partition, offset) -> (key, value)."""
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", check_crcs=False)
    records: dict[tuple[int, int], tuple[bytes, bytes]] = {}
    try:
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends.get(tp.partition, 0) for tp in parts):
            assert time.monotonic() < deadline, (
                f"could not read {topic} up to {ends} in {timeout_s} s: "
                f"{ {tp.partition: consumer.position(tp) for tp in parts} }")
            for tp, batch in consumer.poll(timeout_ms=500).items():
                for rec in batch:
                    records[(tp.partition, rec.offset)] = (rec.key, rec.value)
    finally:
        consumer.close()
    return records


def _events_counters(port: int) -> dict[str, float]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^bandit_learner_events_total\{outcome="([a-z_]+)"\} ([0-9.e+]+)$', text, re.M)}


def _spawn_learner(url: str, bootstrap: str, topic: str, name: str, metrics_port: int,
                   log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "streams.learner", "--bootstrap", bootstrap,
         "--database-url", url, "--feedback-topic", topic,
         "--dead-letter-topic", f"{topic}.dead", "--group-id", GROUP, "--dim", str(DIM),
         "--max-poll-records", "50", "--no-create-topics", "--client-id", name,
         "--metrics-port", str(metrics_port)],
        env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=ROOT)


@pytest.fixture(scope="module")
def persistent_broker() -> Iterator[PersistentBroker]:
    tansu_binary()  # fails (not skips) when the broker itself is missing
    run_dir = Path(tempfile.mkdtemp(prefix="bandit-kafka-s3-", dir="/tmp"))
    broker = PersistentBroker(run_dir)
    installed = broker.run("install-s3", timeout_s=600)
    if installed.returncode != 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        pytest.skip("the S3 server for the persistent broker could not be installed "
                    f"(ops/kafka.sh install-s3): {installed.stderr.strip()[-800:]}")
    try:
        yield broker
    finally:
        broker.run("stop")
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def restart(private_postgres: PrivatePostgres, persistent_broker: PersistentBroker,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The scenario, once: learners running through a broker kill and restart."""
    started = time.monotonic()
    url = private_postgres.url
    upgrade(url)
    broker = persistent_broker
    broker.start()
    topic = f"restart-{uuid.uuid4().hex[:8]}"
    ensure_topics(StreamsConfig(bootstrap=broker.bootstrap, feedback_topic=topic,
                                dead_letter_topic=f"{topic}.dead", partitions=PARTITIONS))
    world = World(url, seed=23)
    world.add_tenants(3)
    log_dir = tmp_path_factory.mktemp("learners")
    ports: list[int] = []
    learners: list[subprocess.Popen] = []

    def spawn() -> subprocess.Popen:
        i = len(learners)
        ports.append(free_port())
        learners.append(_spawn_learner(url, broker.bootstrap, topic, f"learner-{i}",
                                       ports[i], log_dir / f"learner-{i}.log"))
        return learners[i]

    def log_of(i: int) -> str:
        return (log_dir / f"learner-{i}.log").read_text(errors="replace")

    def logs() -> str:
        return "\n".join(f"--- learner-{i}\n{log_of(i)[-2500:]}" for i in range(len(learners)))

    seen: dict[str, Any] = {"world": world, "topic": topic}
    survivor, victim = spawn(), spawn()
    try:
        # 1. Feedback while the learners apply it; the broker dies right after the last
        #    acknowledged record, the learners possibly behind.
        with Load(world, broker.bootstrap, topic) as before:
            _wait_progress(url, GROUP, topic, {}, timeout_s=60)
            time.sleep(1.0)
        seen["kill_s"] = broker.kill()
        seen["stored_at_kill"] = stored_offsets(url, GROUP, topic)
        seen["ends_before"] = dict(before.ends)
        before.prod.close(timeout=0)
        time.sleep(3.0)  # the learners see the broker gone (no fetch, no heartbeat)
        seen["learners_alive_during"] = [p.poll() is None for p in learners]
        # One learner crashes during the outage (its counters read just before): after
        # the restart a new one takes its place, the group rebalances and every
        # partition is assigned again, so both learners seek to the stored offsets.
        seen["stored_during"] = stored_offsets(url, GROUP, topic)
        victim_counters = _events_counters(ports[1])
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        seen["stored_after_crash"] = stored_offsets(url, GROUP, topic)

        # 2. The same storage, a new broker process.
        broker.start()
        restarted = time.monotonic()
        replacement = spawn()
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap, client_id="restart-check")
        try:
            described = admin.describe_topics([topic])
        finally:
            admin.close()
        seen["partitions_after"] = len(described[0]["partitions"])
        seen["records_after_restart"] = _read_all(broker.bootstrap, topic, before.ends)

        # 3. More feedback; the learners must catch up on all of it.
        with Load(world, broker.bootstrap, topic) as after:
            time.sleep(1.5)
        after.prod.close(timeout=5)
        ends = {p: max(before.ends.get(p, 0), after.ends.get(p, 0))
                for p in range(PARTITIONS)}
        wait_caught_up(url, GROUP, topic, Ends(ends), timeout_s=60)
        seen["caught_up_after_restart_s"] = time.monotonic() - restarted
        time.sleep(0.6)  # the counters are updated after the write the wait saw
        seen["counters"] = [_events_counters(ports[0]), victim_counters,
                            _events_counters(ports[2])]
        seen["ends"] = ends
        seen["stored_final"] = stored_offsets(url, GROUP, topic)
        seen["records_final"] = _read_all(broker.bootstrap, topic, ends)
        seen["events_before"], seen["events_after"] = before.events, after.events
        seen["learners_alive_after"] = [p.poll() is None for p in (survivor, replacement)]
        for p in (survivor, replacement):
            p.send_signal(signal.SIGTERM)
        seen["exit_codes"] = [p.wait(30) for p in (survivor, replacement)]
        with world.conn() as conn:
            seen["applied_rows"] = conn.execute(
                "SELECT count(*) FROM learner_applied WHERE group_id = %s",
                (GROUP,)).fetchone()[0]
    except BaseException:
        print(logs())
        raise
    finally:
        for p in learners:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    seen["logs"] = logs()
    # "assigned [..]" lines of the survivor (all of them) and of the replacement.
    seen["assignments"] = [re.findall(r"streams\.learner INFO assigned (\[[0-9, ]*\])",
                                      log_of(i)) for i in (0, 2)]
    seen["seconds"] = time.monotonic() - started
    print(f"\nbroker restart: ends before kill {seen['ends_before']}, stored at kill "
          f"{seen['stored_at_kill']}, during the outage {seen['stored_during']}; "
          f"killed in {seen['kill_s']:.2f} s; ends after {seen['ends']}, stored "
          f"{seen['stored_final']}; caught up {seen['caught_up_after_restart_s']:.1f} s "
          f"after the restart; learner counters (survivor, crashed, replacement) "
          f"{seen['counters']}; assignments (survivor, replacement) "
          f"{seen['assignments']}; scenario {seen['seconds']:.1f} s")
    return seen


def test_broker_restart_keeps_topics_and_records(restart: dict[str, Any]) -> None:
    ends_before, events_before = restart["ends_before"], restart["events_before"]
    assert sum(ends_before.values()) == len(events_before) > 0
    assert restart["partitions_after"] == PARTITIONS
    # Every record acknowledged before the kill is there after the restart, byte for
    # byte, below the old end of its partition (offsets without a gap: _read_all and
    # the count), and nothing else is.
    before = restart["records_after_restart"]
    assert len(before) == len(events_before)
    assert sorted(v for _, v in before.values()) == sorted(
        encode_feedback(e) for e in events_before)
    assert all(k == json.loads(v)["decision_id"].encode() for k, v in before.values())
    # The records produced after the restart are appended after the old ends.
    final = restart["records_final"]
    assert len(final) == len(restart["events_before"]) + len(restart["events_after"])
    for p in range(PARTITIONS):
        offsets = sorted(o for q, o in final if q == p)
        assert offsets == list(range(restart["ends"][p])), f"partition {p}: gaps or a reset"
        assert restart["ends"][p] > ends_before.get(p, 0), f"partition {p}: nothing new"
    # ...and those of before the kill are still the same records at the same offsets.
    assert {k: v for k, v in final.items() if k in before} == before


def test_learners_resume_at_stored_offsets(restart: dict[str, Any]) -> None:
    assert all(restart["learners_alive_during"]), restart["logs"]
    assert all(restart["learners_alive_after"]), restart["logs"]
    assert restart["exit_codes"] == [0, 0], restart["logs"]
    stored_at_kill, ends_before = restart["stored_at_kill"], restart["ends_before"]
    assert any(o > 0 for o in stored_at_kill.values()), "nothing applied before the kill"
    assert all(stored_at_kill.get(p, -1) <= ends_before.get(p, 0) for p in range(PARTITIONS))
    # The crashed learner's counters cover everything it wrote: nothing moved between
    # reading them and its death.
    assert restart["stored_after_crash"] == restart["stored_during"]
    # After the restart the partitions were assigned again: the replacement took some,
    # seeking to their stored offsets (the survivor's assignment may keep the rest).
    survivor, replacement = restart["assignments"]
    assert any(a != "[]" for a in replacement), restart["logs"]
    # Nothing skipped: every partition's stored offset is its end.
    assert restart["stored_final"] == restart["ends"]
    events = restart["events_before"] + restart["events_after"]
    distinct = {(e.decision_id, e.event_id) for e in events}
    applied = sum(c.get("applied", 0.0) for c in restart["counters"])
    duplicate = sum(c.get("duplicate", 0.0) for c in restart["counters"])
    assert applied == len(distinct), restart["counters"]
    assert restart["applied_rows"] == len(distinct)
    # Nothing read twice: the only duplicates are the repeats that were sent. A learner
    # that went back before its stored offset would count the records again here.
    assert duplicate == len(events) - len(distinct), restart["counters"]
    assert sum(c.get("dead_lettered", 0.0) for c in restart["counters"]) == 0


def test_broker_restart_statistics_equal_replay(restart: dict[str, Any]) -> None:
    events = restart["events_before"] + restart["events_after"]
    assert_same_statistics(
        load_statistics(restart["world"].url, GROUP, restart["topic"]),
        replay(restart["world"], events))
