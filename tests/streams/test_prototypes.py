"""``BANDIT_ROUTER_PROTOTYPE_MAP`` in distributed mode: API replica and learner configured
from the same settings see the map's dimension; a process without the map refuses the
stored statistics."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from fastapi.testclient import TestClient
from kafka import KafkaConsumer, TopicPartition

from bandit.featurize import HashingFeaturizer, PrototypeMap
from service.app import create_app
from service.config import Settings
from service.distributed import streams_config
from streams.learner import Learner
from streams.schemas import decode_decision
from streams.stats import DimensionMismatchError
from tests.service.conftest import ADMIN_KEY, add_model, create_tenant
from tests.streams.helpers import DIM
from tests.streams.test_learner import Running

pytestmark = pytest.mark.integration

K = 3
TOPICS = ["solve the integral of x squared", "write a poem about autumn",
          "translate this sentence to german"]


def test_map_dim_through_kafka_learner_and_refused_without_map(
        fresh_database_url: str, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str, tmp_path) -> None:
    prompts = [f"{TOPICS[i % K]} #{i}" for i in range(60)]
    map_path = tmp_path / "map.json"
    # Distributed mode featurizes with the hashing featurizer's version 1 unless
    # HASHING_VERSION is set (the learners' statistics do not record the version).
    prototype_map = PrototypeMap.fit(HashingFeaturizer(DIM, seed=0, version=1)
                                     .transform(prompts), K, temperature=0.1)
    prototype_map.save(str(map_path))
    feedback_topic, decisions_topic = make_topic(partitions=2), make_topic(partitions=1)
    values = {"database_url": fresh_database_url, "admin_key": ADMIN_KEY, "dim": DIM,
              "policy_seed": 3, "kafka_bootstrap": kafka_bootstrap,
              "feedback_topic": feedback_topic, "decisions_topic": decisions_topic,
              "dead_letter_topic": make_topic(partitions=1), "learner_group": unique_group_id,
              "snapshot_poll_interval_s": 0.5, "learner_metrics_port": 0}
    with_map = Settings(**values, prototype_map=map_path)  # type: ignore[arg-type]
    without_map = Settings(**values)  # type: ignore[arg-type]
    # The learner is configured as `bandit-router learn` does it, from the same settings.
    config = streams_config(with_map)
    assert config.dim == K and streams_config(without_map).dim == DIM

    with TestClient(create_app(with_map)) as api:
        models = [add_model(api, f"proto-{i}") for i in range(2)]
        tenant = create_tenant(api)
        decided = []
        for i, text in enumerate(prompts[:12]):
            r = api.post("/v1/decide", json={"query": {"text": text}}, headers=tenant)
            assert r.status_code == 200, r.text
            decided.append(r.json())
            r = api.post("/v1/feedback", json={"decision_id": decided[-1]["decision_id"],
                                               "quality": 0.8, "event_id": f"e{i}"},
                         headers=tenant)
            assert r.status_code == 202, r.text
        learner = Learner(config, fresh_database_url)
        learner.start(create_topics=False)
        running = Running(learner)
        try:
            expected = Counter(d["model"] for d in decided)
            deadline = time.monotonic() + 45
            while True:
                shared = api.app.state.routing.shared
                seen = {m: shared["linucb"].observations(m)["quality"] for m in models}
                if seen == {m: expected.get(m, 0) for m in models}:
                    break
                assert time.monotonic() < deadline, (seen, dict(expected))
                time.sleep(0.2)
        finally:
            running.stop()
        assert learner.metrics.events.labels("applied")._value.get() == len(decided)
        assert {p.dim for p in api.app.state.routing.shared.values()} == {K}

    consumer = KafkaConsumer(decisions_topic, bootstrap_servers=kafka_bootstrap,
                             auto_offset_reset="earliest", consumer_timeout_ms=3000)
    published = {decode_decision(r.value).decision_id: decode_decision(r.value)
                 for r in consumer}
    consumer.close()
    first = published[decided[0]["decision_id"]]
    np.testing.assert_allclose(
        first.context, prototype_map.transform(HashingFeaturizer(DIM, seed=0, version=1)
                                               .transform_one(prompts[0])),
        rtol=0, atol=1e-12)

    # Forgetting the map on a learner or an API replica refuses the K-dim statistics:
    # at the learner's start, and (if it started before anything was stored) when it is
    # assigned a partition (the listener is called directly, as in test_forgetting).
    late = Learner(streams_config(without_map), fresh_database_url, client_id="proto-late")
    with pytest.raises(DimensionMismatchError, match="BANDIT_ROUTER_PROTOTYPE_MAP"):
        late._check_stored_statistics()  # noqa: SLF001
    late._check_stored_statistics = lambda: None  # type: ignore[method-assign]
    late.start(create_topics=False)
    try:
        late._assign([TopicPartition(feedback_topic, p) for p in range(2)])  # noqa: SLF001
        assert not late.running and late.partitions == {}
        with pytest.raises(DimensionMismatchError, match="BANDIT_ROUTER_PROTOTYPE_MAP"):
            late.step(timeout_ms=100)
    finally:
        late.close()
    with pytest.raises(DimensionMismatchError, match=f"is {DIM} here.*have {K} dimensions"):
        with TestClient(create_app(without_map)):
            pass
