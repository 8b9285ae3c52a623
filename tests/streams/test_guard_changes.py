"""The replicas' incremental guard rebuild (service/guards.py ``GuardFollower``, migration
0010's ``guard_changes``) against the full rebuild from the decision log
(``Guards.rebuild``), on the real PostgreSQL: decisions written, outcomes updated several
times between refreshes (as learners do), decisions deleted, a change committed after a
refresh by a transaction that began before it, a baseline moved (issue 17)."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import psycopg
import pytest
from psycopg.types.json import Json
from sqlalchemy import create_engine

from bandit import Preferences
from bandit.conservative import GuardRecord, GuardState
from service.budget import Ledger
from service.db.engine import upgrade
from service.domain import TenantState
from service.guards import GuardFollower, Guards
from service.metrics import Metrics
from service.registry import Registry
from tests.service.conftest import make_settings
from tests.streams.conftest import libpq_url

MODELS = ("base", "m1", "m2")


@pytest.fixture()
def setup(fresh_database_url: str) -> Iterator[tuple[str, Guards, GuardFollower]]:
    upgrade(fresh_database_url)
    engine = create_engine(fresh_database_url)
    lock = threading.RLock()
    registry = Registry(make_settings(fresh_database_url), engine, lock)
    guards = Guards(engine, registry, Metrics(), lock)
    # full_every_s: never again after the first refresh, so that every later one is
    # incremental (what is tested).
    yield (libpq_url(fresh_database_url), guards,
           GuardFollower(guards, libpq_url(fresh_database_url), full_every_s=1e9))
    engine.dispose()


def _tenant(conn: psycopg.Connection, baseline: str | None = "base") -> TenantState:
    tid = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO tenants (id, name, key_hash, weight_quality, weight_cost,"
        " weight_latency, policy, scope, on_budget_exhausted, created_at, updated_at)"
        " VALUES (%s, %s, %s, 1, 0, 0, 'linucb', 'shared', 'cheapest', now(), now())",
        (tid, "t-" + tid[:8], uuid.uuid4().hex))
    return TenantState(tid, "t", "h", Preferences(1.0, 0.0, 0.0), "linucb", "shared",
                       "cheapest", Ledger(None, None), baseline_model=baseline)


def _decide(conn: psycopg.Connection, tenant: TenantState, rng: np.random.Generator, *,
            guarded: bool = True, baseline: str = "base",
            at: datetime | None = None) -> str:
    played = bool(rng.uniform() < 0.4)
    u = float(rng.uniform(0.3, 0.7))
    record = GuardRecord(baseline, played, u, float(rng.uniform(0.01, 0.2)),
                         float(rng.uniform(0.3, 0.8)), float(rng.uniform(0.1, 0.6)),
                         float(rng.uniform(0.2, 1.0)))
    decision_id = str(uuid.uuid4())
    conn.execute(
        "INSERT INTO decisions (id, tenant_id, model, policy, policy_version, scope,"
        " propensity, context, predictions, predicted_cost_usd, charged_usd, over_budget,"
        " created_at, guard) VALUES (%s, %s, %s, 'linucb', 0, 'shared', 1.0, %s, %s, 0, 0,"
        " false, %s, %s)",
        (decision_id, tenant.id, baseline if played else "m1", b"\0" * 8, Json({}),
         at or datetime.now(UTC),
         # An unguarded decision: the ORM's JSON null, as the API writes it.
         Json({"record": record.to_list(), "outcome": None} if guarded else None)))
    return decision_id


def _outcome(conn: psycopg.Connection, decision_id: str, reward: float) -> None:
    """What a learner's update of a guarded decision writes (merge_outcome's shape)."""
    conn.execute("UPDATE decisions SET guard = json_build_object('record', guard -> 'record',"
                 " 'outcome', json_build_object('quality', %s::float8), 'reward', %s::float8)"
                 " WHERE id = %s", (reward, reward, decision_id))


def _full(guards: Guards, tenant: TenantState) -> GuardState:
    twin = dataclasses.replace(tenant, guard_state=GuardState())
    guards.rebuild(twin)
    return twin.guard_state


def _assert_equal(guards: Guards, tenants: list[TenantState]) -> None:
    for tenant in tenants:
        full = _full(guards, tenant).to_dict()
        assert full["rounds"] > 0, "nothing to compare"
        got = tenant.guard_state.to_dict()
        assert got.keys() == full.keys()
        for name, value in full.items():
            assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), (name, got, full)


def test_incremental_guard_rebuild_equals_full_rebuild(setup):
    url, guards, follower = setup
    rng = np.random.default_rng(5)
    with psycopg.connect(url, autocommit=True) as conn:
        a, b, other = _tenant(conn), _tenant(conn), _tenant(conn)
        ids = {t.id: [_decide(conn, t, rng) for _ in range(40)] for t in (a, b, other)}
        for t in (a, b):
            _decide(conn, t, rng, guarded=False)
            _decide(conn, t, rng, baseline="m2")  # recorded against another baseline
        for d in ids[a.id][:20]:
            _outcome(conn, d, float(rng.uniform()))
        follower.refresh([a, b])  # the first refresh: in full
        assert follower.full_rebuilds == 2
        _assert_equal(guards, [a, b])

        # A writer whose transaction began before the next refresh and commits after it.
        late = psycopg.connect(url)
        late_id = _decide(late, a, rng)
        for _ in range(3):  # several outcomes of one decision between two refreshes
            for d in ids[a.id][10:30] + ids[b.id][:5]:
                _outcome(conn, d, float(rng.uniform()))
        new = [_decide(conn, t, rng) for t in (a, b) for _ in range(10)]
        for d in new[:6]:
            _outcome(conn, d, float(rng.uniform()))
        conn.execute("DELETE FROM decisions WHERE id = ANY(%s)",
                     (ids[a.id][:3] + ids[a.id][35:38],))
        follower.refresh([a, b])
        assert follower.full_rebuilds == 2 and follower.changes_applied > 0
        _assert_equal(guards, [a, b])

        late.commit()
        late.close()
        _outcome(conn, late_id, 0.25)
        follower.refresh([a, b])
        _assert_equal(guards, [a, b])
        assert follower.full_rebuilds == 2

        # The baseline moved (another replica): that tenant is rebuilt in full.
        since = datetime.now(UTC) - timedelta(seconds=1)
        b.baseline_model, b.guard_since = "m2", since
        for _ in range(5):
            _outcome(conn, _decide(conn, b, rng, baseline="m2"), float(rng.uniform()))
        _decide(conn, b, rng, baseline="m2", at=since - timedelta(hours=1))  # before it
        follower.refresh([a, b])
        assert follower.full_rebuilds == 3
        _assert_equal(guards, [a, b])
        _outcome(conn, _decide(conn, b, rng, baseline="m2"), 0.5)
        _outcome(conn, _decide(conn, a, rng), 0.5)
        follower.refresh([a, b])
        _assert_equal(guards, [a, b])
        assert follower.full_rebuilds == 3
