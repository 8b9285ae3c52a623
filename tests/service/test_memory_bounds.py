"""Memory that stays bounded however long the service runs (issue 7: flat RSS under load).

The decision writer writes each batch as one multi-row INSERT on SQLite; every row count
is a distinct SQL text, and Python's sqlite3 keeps up to 128 prepared statements per
connection (about 2.8 KB per row of a ``decisions`` INSERT). Before the writer split
batches into parts of 2**k rows, batches of every size up to 200 left ~50 MB of prepared
statements behind, and under load the RSS grew with every new batch size
(docs/reliability.md, load). SQLite only: on PostgreSQL the writer does not build these
statements.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db import models as m
from service.db.engine import make_engine, upgrade
from service.writer import DecisionWriter

MAX_BATCH = 200


def _sqlite_library() -> ctypes.CDLL:
    """The SQLite library Python's sqlite3 module uses (the same loaded copy)."""
    import _sqlite3

    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    if "libsqlite3" not in maps:
        pytest.skip(f"sqlite3 is not a shared libsqlite3 here ({_sqlite3.__file__})")
    lib = ctypes.CDLL(ctypes.util.find_library("sqlite3") or "libsqlite3.so.0")
    lib.sqlite3_memory_used.restype = ctypes.c_int64
    return lib


def _row(tenant_id: str) -> dict[str, object]:
    now = datetime.now(UTC)
    return {"id": str(uuid.uuid4()), "tenant_id": tenant_id, "model": "model-a",
            "policy": "linucb", "policy_version": 1, "scope": "shared", "propensity": 0.5,
            "context": bytes(64 * 8), "predictions": {"model-a": {"quality": 0.5}},
            "predictions_json": b'{"model-a":{"quality":0.5}}', "predicted_cost_usd": 0.001,
            "charged_usd": 0.001, "over_budget": False, "created_at": now}


def test_writer_statement_memory_bounded_for_every_batch_size(tmp_path):
    url = f"sqlite:///{tmp_path / 'router.db'}"
    upgrade(url)
    engine = make_engine(url)
    tenant_id = str(uuid.uuid4())
    with Session(engine) as session, session.begin():
        session.add(m.Tenant(id=tenant_id, name="t", key_hash="0" * 64, policy="linucb"))
    sqlite = _sqlite_library()
    # A long flush interval: the rows of each round are all queued before the writer,
    # woken by flush(), takes them as one batch of exactly that size.
    writer = DecisionWriter(engine, queue_size=10_000, batch_size=500, flush_interval_s=5.0)
    writer.start()
    try:
        assert writer.submit(_row(tenant_id)) and writer.flush(30)  # warm the connection
        before = sqlite.sqlite3_memory_used()
        written = 1
        for n in range(1, MAX_BATCH + 1):
            for _ in range(n):
                assert writer.submit(_row(tenant_id))
            assert writer.flush(30)
            written += n
        grown_mb = (sqlite.sqlite3_memory_used() - before) / 2**20
    finally:
        writer.stop()
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(m.Decision)) == written
    engine.dispose()
    # Unbounded shapes: the 128 most recent (73..200 rows), ~50 MB. Powers of two: 8
    # shapes (1..128 rows) plus the connection's page cache, a few MB.
    assert grown_mb < 12, f"SQLite holds {grown_mb:.1f} MB more after batches of 1..{MAX_BATCH}"
    shapes = sorted(writer._insert._sql)
    assert len(shapes) <= 9, f"{len(shapes)} distinct INSERT shapes: {shapes}"
    assert all(n & (n - 1) == 0 for n in shapes), shapes
