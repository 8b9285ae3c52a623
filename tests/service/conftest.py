"""Fixtures for the service tests: every API test runs on SQLite and on the real
PostgreSQL server started by ``ops/`` (``BANDIT_TEST_DATABASE_URL``).

PostgreSQL tests FAIL (never skip) when the server is not reachable: start it with
``bash ops/postgres.sh start`` and export ``BANDIT_TEST_DATABASE_URL=$(bash ops/postgres.sh
url)``, or run everything with ``bash ops/test.sh``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg import sql
from sqlalchemy.engine import make_url

from service.app import create_app
from service.config import Settings

DATABASE_URL_ENV = "BANDIT_TEST_DATABASE_URL"
HOW_TO_START = ("start PostgreSQL with `bash ops/postgres.sh start` and export "
                f"{DATABASE_URL_ENV}=$(bash ops/postgres.sh url), or run `bash ops/test.sh`")
ADMIN_KEY = "bra_test-admin-key-0123456789abcdefghijklmnopqrstuvwxyz"
DIM = 8
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROBLEM_JSON = "application/problem+json"


def _pg_admin_conninfo(url: str) -> tuple[str, object]:
    parsed = make_url(url)
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    return conninfo, parsed


@contextmanager
def _postgres_factory() -> Iterator[Callable[[], str]]:
    url = os.environ.get(DATABASE_URL_ENV)
    if not url:
        pytest.fail(f"{DATABASE_URL_ENV} is not set: {HOW_TO_START}", pytrace=False)
    conninfo, parsed = _pg_admin_conninfo(url)
    try:
        admin = psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {parsed.render_as_string()} is unreachable ({exc}): "
                    f"{HOW_TO_START}", pytrace=False)
    created: list[str] = []

    def new_database() -> str:
        name = f"bandit_svc_{uuid.uuid4().hex[:12]}"
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created.append(name)
        return parsed.set(database=name).render_as_string(hide_password=False)

    try:
        yield new_database
    finally:
        for name in created:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                          .format(sql.Identifier(name)))
        admin.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def new_database_url(backend: str,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], str]]:
    """A function returning the URL of a fresh, empty database of the module's backend."""
    if backend == "sqlite":
        folder = tmp_path_factory.mktemp("sqlite")

        def new_sqlite() -> str:
            return f"sqlite:///{folder / (uuid.uuid4().hex + '.db')}"

        yield new_sqlite
    else:
        with _postgres_factory() as factory:
            yield factory


def make_settings(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {"database_url": url, "admin_key": ADMIN_KEY, "dim": DIM,
                                 "policy_seed": 7, "checkpoint_interval_s": 3600.0}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(new_database_url: Callable[[], str]) -> Iterator[TestClient]:
    """One app per module and backend, on its own fresh database."""
    with TestClient(create_app(make_settings(new_database_url()))) as c:
        yield c


# ------------------------------------------------------------------------ helpers
def stored_decision(client: TestClient, decision_id: str):
    """The decision row as the database holds it (after the writer's flush)."""
    from sqlalchemy.orm import Session

    from service.db import models as m

    service = client.app.state.routing
    service.writer.flush(timeout=5.0)
    with Session(service.engine) as session:
        row = session.get(m.DecisionRow, decision_id)
        assert row is not None
        session.expunge(row)
        return row


def create_tenant(client: TestClient, name: str = "acme") -> dict[str, str]:
    """Create a tenant; returns its Authorization header (with the id under 'X-Tenant')."""
    r = client.post("/v1/admin/tenants", json={"name": name}, headers=ADMIN)
    assert r.status_code == 201, r.text
    body = r.json()
    return {"Authorization": f"Bearer {body['api_key']}", "X-Tenant": body["id"]}


def add_model(client: TestClient, name: str | None = None, input_price: float = 1.0,
              output_price: float = 2.0, **extra: object) -> str:
    name = name or f"m-{uuid.uuid4().hex[:8]}"
    r = client.post("/v1/admin/models", json={"name": name, "input_price_per_mtok": input_price,
                                              "output_price_per_mtok": output_price, **extra},
                    headers=ADMIN)
    assert r.status_code == 201, r.text
    return name


def embedding(seed: int = 0) -> list[float]:
    import numpy as np

    v = np.random.default_rng(seed).standard_normal(DIM)
    return (v / np.linalg.norm(v)).tolist()


def decide(client: TestClient, headers: dict[str, str], candidates: list[str] | None = None,
           seed: int = 0, **extra: object):
    body: dict[str, object] = {"query": {"embedding": embedding(seed)}, **extra}
    if candidates is not None:
        body["candidates"] = candidates
    return client.post("/v1/decide", json=body, headers=headers)


def assert_problem(response, status: int, field: str | None = None,
                   detail_contains: str | None = None) -> dict:
    """Assert an RFC 9457 problem: status, media type, members and the named field."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert body["status"] == status
    assert body["type"].startswith("https://") and body["title"] and body["detail"]
    if field is not None:
        fields = [e["field"] for e in body["errors"]]
        assert field in fields, fields
        assert all("allowed" in e and "message" in e for e in body["errors"])
    if detail_contains is not None:
        assert detail_contains in body["detail"], body["detail"]
    return body
