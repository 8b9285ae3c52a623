"""streams.telemetry against the real Kafka-protocol broker started by ``ops/``."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaConsumer, TopicPartition

from streams.schemas import InvalidEventError, decode_feedback
from streams.telemetry import FeedbackProducer

TENANT = "3f9f1c9e-0000-4000-8000-000000000001"


def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 20.0) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=2000)
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        records = []
        deadline = time.monotonic() + timeout_s
        while len(records) < expected and time.monotonic() < deadline:
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return records
    finally:
        consumer.close()


def test_send_feedback_keyed_by_decision_and_parseable(kafka_bootstrap, make_topic):
    topic = make_topic(partitions=3)
    decisions = [str(uuid.uuid4()) for _ in range(4)]
    with FeedbackProducer(kafka_bootstrap, TENANT, topic=topic) as telemetry:
        futures = [telemetry.send(d, quality=0.25 * i, latency_ms=100.0 + i,
                                  event_id=f"e-{i}") for i, d in enumerate(decisions)]
        # The same event again (a product re-sending after a timeout): same id, same key.
        futures.append(telemetry.send(decisions[0], quality=0.0, latency_ms=100.0,
                                      event_id="e-0"))
        metadata = [f.get(timeout=20) for f in futures]
    assert all(m.topic == topic for m in metadata)
    # Every event of one decision lands on one partition.
    assert metadata[0].partition == metadata[-1].partition

    records = read_all(kafka_bootstrap, topic, expected=5)
    assert len(records) == 5
    by_event = {}
    for record in records:
        event = decode_feedback(record.value)
        assert record.key == event.decision_id.encode()
        assert event.tenant_id == TENANT and event.sent_at is not None
        by_event.setdefault((event.decision_id, event.event_id), []).append(event)
    # The repeat carries the same (decision_id, event_id): the learners apply it once.
    assert len(by_event) == 4 and len(by_event[(decisions[0], "e-0")]) == 2
    assert by_event[(decisions[2], "e-2")][0].quality == pytest.approx(0.5)
    assert by_event[(decisions[3], "e-3")][0].latency_ms == pytest.approx(103.0)


def test_send_feedback_invalid_quality_raises_before_kafka(kafka_bootstrap, make_topic):
    topic = make_topic(partitions=1)
    with FeedbackProducer(kafka_bootstrap, TENANT, topic=topic) as telemetry:
        with pytest.raises(InvalidEventError) as caught:
            telemetry.send(str(uuid.uuid4()), quality=1.2)
        assert caught.value.field == "quality" and caught.value.reason == "out-of-range"
        with pytest.raises(InvalidEventError, match="at least one"):
            telemetry.send(str(uuid.uuid4()))
        telemetry.send(str(uuid.uuid4()), cost_usd=0.001).get(timeout=20)
    records = read_all(kafka_bootstrap, topic, expected=1)
    assert [decode_feedback(r.value).cost_usd for r in records] == [pytest.approx(0.001)]


def test_create_producer_acks_all_and_idempotent(kafka_bootstrap):
    telemetry = FeedbackProducer(kafka_bootstrap, TENANT, acks=1, enable_idempotence=False)
    try:
        config = telemetry._producer.config
        # Caller overrides of what exactly-once relies on are ignored.
        assert config["acks"] == -1 and config["enable_idempotence"] is True
    finally:
        telemetry.close()


def test_create_producer_empty_tenant_rejected():
    with pytest.raises(InvalidEventError, match="tenant_id"):
        FeedbackProducer("127.0.0.1:9", "")
