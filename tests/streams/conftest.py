"""Fixtures for the streams tests: the real PostgreSQL and Kafka-protocol broker.

The server fixtures are the ones of ``tests/integration/conftest.py`` (loaded from that
file, not copied), so both folders fail the same way, with the same message, when the
servers are not running.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_integration_fixtures", Path(__file__).resolve().parents[1] / "integration" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

database_url = _fixtures.database_url
fresh_database_url = _fixtures.fresh_database_url
kafka_bootstrap = _fixtures.kafka_bootstrap
kafka_admin = _fixtures.kafka_admin
make_topic = _fixtures.make_topic
unique_group_id = _fixtures.unique_group_id
consumer_settings = _fixtures.consumer_settings
commit_with_retry = _fixtures.commit_with_retry_fixture
create_topic = _fixtures.create_topic
libpq_url = _fixtures.libpq_url
