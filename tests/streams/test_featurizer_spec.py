"""The learners record the featurizer that made the contexts with their statistics, and
every learner and decider refuses statistics of another one (issue 17)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import psycopg
import pytest

from service.config import Settings
from service.db.engine import upgrade
from service.distributed import StatisticsFollower, streams_config
from streams.learner import Learner, libpq_url
from streams.stats import FeaturizerMismatchError
from tests.streams.helpers import DIM, Ends, World, producer, send_events, wait_caught_up
from tests.streams.test_learner import Running

pytestmark = pytest.mark.integration


def test_streams_config_featurizer_names_hashing_version(kafka_bootstrap: str) -> None:
    v1 = streams_config(Settings(kafka_bootstrap=kafka_bootstrap, dim=DIM))
    v2 = streams_config(Settings(kafka_bootstrap=kafka_bootstrap, dim=DIM,
                                 hashing_version=2))
    # Distributed mode keeps version 1 unless told (service/features.py).
    assert v1.featurizer is not None and v1.featurizer.startswith(f"hashing-v1:dim={DIM},")
    assert v2.featurizer is not None and v2.featurizer.startswith(f"hashing-v2:dim={DIM},")


def test_learn_featurizer_recorded_and_mismatch_refused(
        fresh_database_url: str, kafka_bootstrap: str, make_topic: Callable[..., str],
        unique_group_id: str) -> None:
    upgrade(fresh_database_url)
    world = World(fresh_database_url, seed=7)
    world.add_tenants(2)
    topic = make_topic(partitions=2)
    settings = Settings(kafka_bootstrap=kafka_bootstrap, dim=DIM, feedback_topic=topic,
                        learner_group=unique_group_id)
    config = replace(streams_config(settings), max_poll_records=50)
    learner = Learner(config, fresh_database_url, client_id="spec-v1")
    learner.start(create_topics=False)
    running = Running(learner)
    ends = Ends()
    send_events(producer(kafka_bootstrap), topic,
                [world.feedback(d) for d in world.add_decisions(40)], ends)
    wait_caught_up(fresh_database_url, unique_group_id, topic, ends)
    running.stop()
    with psycopg.connect(libpq_url(fresh_database_url)) as conn:
        specs = {s for (s,) in conn.execute(
            "SELECT featurizer FROM partition_statistics WHERE group_id = %s",
            (unique_group_id,))}
    assert specs == {config.featurizer}

    # The cluster moved to version 2 without a fresh group: refused, naming the settings.
    v2 = streams_config(settings.model_copy(update={"hashing_version": 2}))
    other = Learner(replace(v2, max_poll_records=50), fresh_database_url,
                    client_id="spec-v2")
    try:
        with pytest.raises(FeaturizerMismatchError, match="BANDIT_ROUTER_HASHING_VERSION") \
                as refused:
            other.start(create_topics=False)
    finally:
        other.close()
    assert refused.value.field == "featurizer"
    assert "hashing-v1:" in str(refused.value) and "hashing-v2:" in str(refused.value)
    # A decider with version 2 refuses the statistics too (and reports why).
    wrong = StatisticsFollower(fresh_database_url, v2, lambda *_: None)
    with pytest.raises(FeaturizerMismatchError, match="fresh consumer group"):
        wrong.refresh()
    assert wrong.error is not None and "hashing-v1:" in wrong.error
    # One with the same featurizer follows them.
    published: list[dict] = []
    StatisticsFollower(fresh_database_url, config,
                       lambda totals, _offsets: published.append(totals)).refresh()
    assert published and published[0]["shared"].arms
