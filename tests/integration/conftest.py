"""Fixtures for integration tests against the real PostgreSQL and Kafka-protocol broker.

`bash ops/test.sh` starts both servers (``ops/postgres.sh``, ``ops/kafka.sh``) and exports

- ``BANDIT_TEST_DATABASE_URL``: a SQLAlchemy URL, ``postgresql+psycopg://...``
- ``BANDIT_TEST_KAFKA_BOOTSTRAP``: ``host:port`` of the broker.

A test that needs them and cannot reach them FAILS with a message saying how to start
them: an integration test that silently skips is a test nobody runs.

Every test collected under ``tests/integration/`` gets the ``integration`` marker.

Tansu (the broker ``ops/kafka.sh`` runs) wants a few client settings: see
``TANSU_CONSUMER_SETTINGS`` and the ``commit_with_retry`` fixture.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaAdminClient, KafkaConsumer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, RebalanceInProgressError
from psycopg import sql
from sqlalchemy.engine import make_url

DATABASE_URL_ENV = "BANDIT_TEST_DATABASE_URL"
KAFKA_BOOTSTRAP_ENV = "BANDIT_TEST_KAFKA_BOOTSTRAP"
HOW_TO_START = (
    "start them with `bash ops/test.sh` "
    "or `bash ops/postgres.sh start && bash ops/kafka.sh start`, then export "
    f"{DATABASE_URL_ENV}=$(bash ops/postgres.sh url) "
    f"{KAFKA_BOOTSTRAP_ENV}=$(bash ops/kafka.sh bootstrap)"
)

# Tansu's group coordinator: with the client defaults (10 s session, 3 s heartbeat)
# rebalances drag on; these values keep joins at a few seconds and are known to work.
TANSU_CONSUMER_SETTINGS: dict[str, object] = {
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "enable_auto_commit": False,
}

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items, so mark only the ones under this folder.
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def libpq_url(sqlalchemy_url: str) -> str:
    """The libpq/psycopg form (``postgresql://``) of a SQLAlchemy ``postgresql+psycopg`` URL."""
    url = make_url(sqlalchemy_url)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _require_env(name: str, what: str) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        pytest.fail(
            f"{name} is not set: this test needs the real {what}; {HOW_TO_START}", pytrace=False
        )
    return value


@pytest.fixture(scope="session")
def database_url() -> str:
    """SQLAlchemy URL of the test PostgreSQL database, checked to accept connections."""
    url = _require_env(DATABASE_URL_ENV, "PostgreSQL")
    try:
        with psycopg.connect(libpq_url(url), connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.fail(f"cannot reach PostgreSQL at {url} ({exc}); {HOW_TO_START}", pytrace=False)
    return url


@pytest.fixture(scope="module")
def fresh_database_url(database_url: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """SQLAlchemy URL of a new, empty database, private to one test module.

    Created with a unique name on the test server and dropped (with ``FORCE``, so a
    leaked connection cannot keep it alive) when the module is done.
    """
    module = re.sub(r"[^a-z0-9]+", "_", request.module.__name__.rsplit(".", 1)[-1].lower())
    name = f"bt_{module[:40]}_{uuid.uuid4().hex[:8]}"
    admin_url = libpq_url(database_url)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield make_url(database_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    """``host:port`` of the Kafka-protocol test broker, checked to answer an admin request."""
    bootstrap = _require_env(KAFKA_BOOTSTRAP_ENV, "Kafka-protocol broker")
    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap, request_timeout_ms=5000, client_id="bandit-tests-probe"
        )
        try:
            admin.list_topics()
        finally:
            admin.close()
    except KafkaError as exc:
        pytest.fail(
            f"cannot reach the Kafka broker at {bootstrap} ({exc!r}); {HOW_TO_START}", pytrace=False
        )
    return bootstrap


@pytest.fixture(scope="session")
def kafka_admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="bandit-tests-admin")
    try:
        yield admin
    finally:
        admin.close()


def create_topic(
    admin: KafkaAdminClient, name: str, partitions: int, timeout_s: float = 10.0
) -> None:
    """Create ``name`` with ``partitions`` partitions and wait until metadata shows them all.

    Explicit creation: the test broker does not auto-create topics.
    """
    admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    deadline = time.monotonic() + timeout_s
    while True:
        described = admin.describe_topics([name])
        if described and len(described[0].get("partitions") or []) == partitions:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"topic {name!r} not visible with {partitions} partitions "
                f"after {timeout_s}s: {described}"
            )
        time.sleep(0.2)


@pytest.fixture
def make_topic(
    kafka_admin: KafkaAdminClient, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """Factory: ``make_topic(partitions=3) -> name`` of a new, uniquely-named topic.

    Topics are deleted after the test (best effort: the broker is in-memory anyway).
    """
    created: list[str] = []
    prefix = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name)[:60].strip("-")

    def _make(partitions: int = 3) -> str:
        name = f"t-{prefix}-{uuid.uuid4().hex[:8]}"
        create_topic(kafka_admin, name, partitions)
        created.append(name)
        return name

    yield _make
    if created:
        try:
            kafka_admin.delete_topics(created)
        except KafkaError:
            pass


@pytest.fixture
def unique_group_id(request: pytest.FixtureRequest) -> str:
    """A consumer-group id no other test (or earlier run on the same broker) uses."""
    return f"g-{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"


def commit_with_retry(
    consumer: KafkaConsumer, offsets: dict | None = None, attempts: int = 20, pause_s: float = 0.5
) -> None:
    """``consumer.commit(offsets)``, retried while the group is rebalancing.

    Tansu answers a commit during a rebalance with REBALANCE_IN_PROGRESS. The member
    must poll to take part in the rebalance; its partitions are paused meanwhile so that
    the poll hands out no records that the caller would never see.
    """
    for attempt in range(attempts):
        try:
            consumer.commit(offsets)
            return
        except RebalanceInProgressError:
            if attempt == attempts - 1:
                raise
            paused = set(consumer.assignment())
            consumer.pause(*paused)
            try:
                consumer.poll(timeout_ms=int(pause_s * 1000))
            finally:
                still_assigned = paused & set(consumer.assignment())
                if still_assigned:
                    consumer.resume(*still_assigned)


@pytest.fixture(name="commit_with_retry")
def commit_with_retry_fixture() -> Callable[..., None]:
    """The :func:`commit_with_retry` helper, for tests (conftest is not importable)."""
    return commit_with_retry


@pytest.fixture
def consumer_settings() -> dict[str, object]:
    """Consumer keyword arguments that work with Tansu; merge your own over a copy."""
    return dict(TANSU_CONSUMER_SETTINGS)
