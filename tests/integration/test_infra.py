"""Smoke tests of the real servers that ``ops/`` starts.

They check the exact guarantees the distributed mode builds on (docs: DESIGN.md,
"Learning at scale"): a rolled-back PostgreSQL transaction leaves nothing behind, a
NOTIFY reaches a listener only once its transaction commits, Kafka keeps per-key
partitioning, and a consumer group resumes at the offsets committed before, neither
earlier nor later.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator

import psycopg
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def engine(fresh_database_url: str) -> Iterator[Engine]:
    eng = create_engine(fresh_database_url, pool_pre_ping=True)
    yield eng
    eng.dispose()


def _count(engine: Engine, table: str) -> int:
    with engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()  # noqa: S608


# ----------------------------------------------------------------------------- PostgreSQL


def test_open_fresh_database_is_empty_and_private(engine: Engine, database_url: str) -> None:
    with engine.connect() as conn:
        name = conn.execute(text("SELECT current_database()")).scalar_one()
        tables = conn.execute(
            text("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")
        ).scalar_one()
    assert name.startswith("bt_test_infra_")
    assert name != database_url.rsplit("/", 1)[-1]
    assert tables == 0


def test_roundtrip_postgres_rows_insert_select(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("CREATE TABLE roundtrip (id serial PRIMARY KEY, arm text NOT NULL, reward float8)")
        )
        conn.execute(
            text("INSERT INTO roundtrip (arm, reward) VALUES (:arm, :reward)"),
            [{"arm": "small", "reward": 0.25}, {"arm": "large", "reward": 0.75}],
        )
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT arm, reward FROM roundtrip ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [("small", 0.25), ("large", 0.75)]


def test_rollback_postgres_transaction_discards_writes(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE offsets (part int PRIMARY KEY, next_offset bigint)"))
        conn.execute(text("INSERT INTO offsets VALUES (0, 10)"))

    # Explicit rollback.
    with engine.connect() as conn:
        conn.execute(text("UPDATE offsets SET next_offset = 99 WHERE part = 0"))
        conn.execute(text("INSERT INTO offsets VALUES (1, 5)"))
        conn.rollback()

    # An exception inside engine.begin(): the statistics delta and the offset must go
    # together or not at all.
    with pytest.raises(RuntimeError, match="crash between writes"), engine.begin() as conn:
        conn.execute(text("UPDATE offsets SET next_offset = 42 WHERE part = 0"))
        raise RuntimeError("crash between writes")

    with engine.connect() as conn:
        rows = conn.execute(text("SELECT part, next_offset FROM offsets ORDER BY part")).all()
    assert [tuple(r) for r in rows] == [(0, 10)]


def test_deliver_postgres_notify_payload_after_commit(fresh_database_url: str) -> None:
    # psycopg itself (not SQLAlchemy): LISTEN needs a long-lived autocommit connection.
    url = (
        make_url(fresh_database_url)
        .set(drivername="postgresql")
        .render_as_string(hide_password=False)
    )
    with psycopg.connect(url, autocommit=True) as listener, psycopg.connect(url) as notifier:
        listener.execute("LISTEN stats_version")

        notifier.execute("SELECT pg_notify('stats_version', '7')")
        # Not committed yet: a decider must not see a version the learners may roll back.
        early = list(listener.notifies(timeout=0.5, stop_after=1))
        assert early == []

        notifier.commit()
        got = list(listener.notifies(timeout=5.0, stop_after=1))

    assert len(got) == 1
    assert got[0].channel == "stats_version"
    assert got[0].payload == "7"


# ----------------------------------------------------------------------------------- Kafka


def _consume(consumer: KafkaConsumer, expected: int, timeout_s: float = 30.0) -> list:
    records: list = []
    deadline = time.monotonic() + timeout_s
    while len(records) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    return records


def test_create_topic_kafka_explicit_partitions(make_topic, kafka_admin) -> None:
    topic = make_topic(partitions=4)
    assert topic in kafka_admin.list_topics()
    (described,) = kafka_admin.describe_topics([topic])
    assert described["error_code"] == 0
    assert sorted(p["partition_index"] for p in described["partitions"]) == [0, 1, 2, 3]


def test_resume_kafka_group_after_committed_offsets(
    kafka_bootstrap, make_topic, unique_group_id, consumer_settings, commit_with_retry
) -> None:
    topic = make_topic(partitions=3)
    n_keys, per_key = 12, 5

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    try:
        futures = [
            (
                f"decision-{k}",
                producer.send(topic, key=f"decision-{k}".encode(), value=f"{k}:{i}".encode()),
            )
            for i in range(per_key)
            for k in range(n_keys)
        ]
        producer.flush(timeout=30)
        sent = [(key, fut.get(timeout=10)) for key, fut in futures]
    finally:
        producer.close()

    partitions_of_key: dict[str, set[int]] = defaultdict(set)
    for key, meta in sent:
        partitions_of_key[key].add(meta.partition)
    # Same key -> same partition: what lets one learner own a decision's feedback.
    assert all(len(parts) == 1 for parts in partitions_of_key.values())
    used = {meta.partition for _, meta in sent}
    assert len(used) >= 2, f"12 keys all hashed to partitions {used}"
    total = n_keys * per_key

    settings = {**consumer_settings, "auto_offset_reset": "earliest"}
    first = KafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, group_id=unique_group_id, **settings
    )
    try:
        records = _consume(first, total)
        assert len(records) == total
        by_partition: dict[int, list[int]] = defaultdict(list)
        for r in records:
            by_partition[r.partition].append(r.offset)
        for offsets in by_partition.values():
            assert offsets == sorted(offsets) == list(range(len(offsets)))
        # Commit a prefix of each partition: as if the learner made only that part durable.
        committed = {
            TopicPartition(topic, p): OffsetAndMetadata(len(offs) // 2, "", -1)
            for p, offs in by_partition.items()
        }
        commit_with_retry(first, committed)
        for tp, om in committed.items():
            assert first.committed(tp) == om.offset
    finally:
        first.close(autocommit=False)

    # auto_offset_reset=earliest: if the commit had been lost, the second consumer would
    # start at 0 and see the whole topic again.
    second = KafkaConsumer(
        topic, bootstrap_servers=kafka_bootstrap, group_id=unique_group_id, **settings
    )
    try:
        expected = {
            (tp.partition, off)
            for tp, om in committed.items()
            for off in range(om.offset, len(by_partition[tp.partition]))
        }
        resumed = _consume(second, len(expected))
        # A short extra poll: anything beyond the expected tail would be a bug.
        resumed += _consume(second, 1, timeout_s=1.0)
    finally:
        second.close(autocommit=False)
    assert {(r.partition, r.offset) for r in resumed} == expected
    assert len(resumed) == len(expected) == total - sum(om.offset for om in committed.values())
