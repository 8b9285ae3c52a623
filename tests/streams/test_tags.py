"""Request tags in distributed mode: the decision event on Kafka carries the tags and the
context they were hashed into (what the learners and any consumer rebuild from)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from kafka import KafkaConsumer

from bandit.featurize import tag_vector
from service.app import create_app
from service.config import Settings
from streams.schemas import decode_decision
from tests.service.conftest import ADMIN_KEY, add_model, create_tenant, embedding
from tests.streams.helpers import DIM

pytestmark = pytest.mark.integration


def test_decision_events_carry_tags_and_tagged_context(
        fresh_database_url: str, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str) -> None:
    decisions_topic = make_topic(partitions=1)
    settings = Settings(database_url=fresh_database_url, admin_key=ADMIN_KEY, dim=DIM,
                        policy_seed=3, kafka_bootstrap=kafka_bootstrap,
                        feedback_topic=make_topic(partitions=1),
                        decisions_topic=decisions_topic,
                        dead_letter_topic=make_topic(partitions=1),
                        learner_group=unique_group_id, learner_metrics_port=0)
    tags = {"app": "support-bot", "task": "code"}
    with TestClient(create_app(settings)) as api:
        add_model(api, "kt-a")
        tenant = create_tenant(api)
        ids = []
        for body_tags in (tags, None):
            body = {"query": {"embedding": embedding(2)}}
            if body_tags:
                body["tags"] = body_tags
            r = api.post("/v1/decide", json=body, headers=tenant)
            assert r.status_code == 200, r.text
            ids.append(r.json()["decision_id"])
    consumer = KafkaConsumer(decisions_topic, bootstrap_servers=kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    published = {e.decision_id: e for e in (decode_decision(r.value) for r in consumer)}
    consumer.close()
    tagged, plain = published[ids[0]], published[ids[1]]
    assert tagged.tags == tags and plain.tags is None
    assert plain.context == embedding(2)
    np.testing.assert_allclose(tagged.context, np.asarray(embedding(2)) + tag_vector(tags, DIM),
                               rtol=0, atol=1e-12)
