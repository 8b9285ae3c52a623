"""Explicit topic creation: the learners never rely on broker auto-creation."""

from __future__ import annotations

import logging
import time

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streams.config import StreamsConfig

__all__ = ["ensure_topics", "create_topic"]

log = logging.getLogger("streams.topics")


def create_topic(admin: KafkaAdminClient, name: str, partitions: int,
                 replication_factor: int = 1, timeout_s: float = 15.0) -> bool:
    """Create ``name`` unless it exists; wait until its metadata shows the partitions.

    Returns True when this call created it. An existing topic is left as it is (its
    partition count is the operator's decision: adding partitions moves keys).
    """
    created = True
    try:
        admin.create_topics([NewTopic(name, num_partitions=partitions,
                                      replication_factor=replication_factor)])
    except TopicAlreadyExistsError:
        created = False
    deadline = time.monotonic() + timeout_s
    while True:
        described = admin.describe_topics([name])
        found = described[0].get("partitions") if described else None
        if found and (not created or len(found) == partitions):
            return created
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {name!r} not visible after {timeout_s}s")
        time.sleep(0.2)


def ensure_topics(config: StreamsConfig, replication_factor: int = 1) -> list[str]:
    """Create the feedback, decisions and dead-letter topics that do not exist yet."""
    admin = KafkaAdminClient(bootstrap_servers=config.bootstrap,
                             client_id="bandit-router-topics")
    try:
        made = [name for name in (config.feedback_topic, config.decisions_topic,
                                  config.dead_letter_topic)
                if create_topic(admin, name, config.partitions, replication_factor)]
    finally:
        admin.close()
    if made:
        log.info("created topics %s with %d partitions", made, config.partitions)
    return made
