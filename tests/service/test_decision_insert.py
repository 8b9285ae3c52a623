"""The decision writer's own INSERT on SQLite (service/decision_insert.py,
``RowInserter``) stores what SQLAlchemy's ``insert(DecisionRow)`` stores, column by
column, whatever the rows share (one time object for a decide batch, formatted once) or
leave out.

One known difference, older than this test: a JSON column's None (``tags``, ``guard``)
is SQL NULL from the writer and the JSON text ``null`` from SQLAlchemy's insert; both
read back as None."""

from __future__ import annotations

import sqlite3
import uuid
from datetime import UTC, datetime, timedelta, timezone

import orjson
from sqlalchemy import insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from service.db import models as m
from service.db.engine import make_engine, upgrade
from service.db.models import DecisionRow
from service.decision_insert import RowInserter
from service.writer import DecisionWriter


def _database(path) -> tuple[str, object, str]:
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = make_engine(url)
    tenant_id = "00000000-0000-0000-0000-000000000001"
    with Session(engine) as session, session.begin():
        session.add(m.Tenant(id=tenant_id, name="t", key_hash="0" * 64, policy="linucb"))
    return url, engine, tenant_id


def _rows(tenant_id: str) -> list[dict[str, object]]:
    batch_time = datetime(2026, 12, 4, 23, 0, 0, 123456, tzinfo=UTC)
    # The same instant written in another zone: equal to batch_time, stored otherwise.
    elsewhere = batch_time.astimezone(timezone(timedelta(hours=1)))
    predictions = {"m-a": {"quality": 0.5, "cost_usd": 1e-5, "score": float("-inf")}}
    rows = []
    for i, when in enumerate([batch_time, batch_time, elsewhere, batch_time,
                              batch_time + timedelta(microseconds=1), batch_time]):
        row: dict[str, object] = {
            "id": str(uuid.UUID(int=i + 1)), "tenant_id": tenant_id, "model": f"m-{i}",
            "policy": "linucb", "policy_version": i, "scope": "shared",
            "propensity": 0.25 * (i % 4), "context": bytes(range(i, i + 16)),
            "predictions": predictions, "predictions_json": orjson.dumps(predictions),
            "predicted_cost_usd": 1e-4 * i, "charged_usd": 2e-4 * i,
            "over_budget": i == 2, "price_usd": None if i == 1 else 3e-5,
            "created_at": when, "tags": {"team": "a"} if i == 3 else None,
            "guard": {"record": [1, 0.5], "outcome": None, "reward": None} if i == 4
            else None}
        rows.append(row)
    del rows[5]["tags"], rows[5]["guard"]  # columns a row does not name are NULL
    del rows[4]["predictions_json"]  # encoded by the column's own processor
    return rows


def _stored(path) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT * FROM decisions ORDER BY id").fetchall()


def _column_names(path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[1] for row in conn.execute("PRAGMA table_info(decisions)")]


def test_writer_insert_stores_what_sqlalchemy_insert_stores(tmp_path):
    fast_path, reference_path = tmp_path / "fast.db", tmp_path / "reference.db"
    _, fast_engine, tenant_id = _database(fast_path)
    _, reference_engine, _ = _database(reference_path)
    rows = _rows(tenant_id)
    inserter = RowInserter(fast_engine)
    assert inserter.fast
    inserter.write(rows)
    inserter.close()
    with reference_engine.begin() as conn:
        # A column a row does not name is NULL (SQLAlchemy wants every key of a batch).
        columns = [c.name for c in DecisionRow.__table__.columns]
        conn.execute(insert(DecisionRow), [{k: row.get(k) for k in columns} for row in rows])
    fast, reference = _stored(fast_path), _stored(reference_path)
    names = _column_names(reference_path)
    json_columns = [names.index("tags"), names.index("guard")]
    reference = [tuple(None if i in json_columns and value == "null" else value
                       for i, value in enumerate(row)) for row in reference]
    assert len(fast) == len(rows)
    assert fast == reference
    # The two zones of one instant are two stored times (a memo by equal value would
    # have written the first for both).
    assert len({row[names.index("created_at")] for row in fast}) == 3
    fast_engine.dispose()
    reference_engine.dispose()


def test_writer_retry_after_a_lost_answer_tells_stored_from_refused(tmp_path, monkeypatch,
                                                                    caplog):
    """Without a spool: a batch's INSERT reaches the database, then the connection dies
    before the answer. The retry meets its own rows (IntegrityError): they are stored,
    not "refused, not stored" nor counted as failed. A row whose id is stored with other
    content is still a refusal."""
    _, engine, tenant_id = _database(tmp_path / "lost.db")
    rows = _rows(tenant_id)[:4]
    other = dict(rows[3], id=str(uuid.UUID(int=99)))
    clash = dict(other, model="m-other")  # other's id, another decision
    real_write = RowInserter.write
    lost: list[bool] = []

    def write_then_lose_the_answer(self: RowInserter, batch: list[dict[str, object]]) -> None:
        real_write(self, batch)
        if not lost:
            lost.append(True)
            raise OperationalError("INSERT", {}, ConnectionResetError("connection lost"))

    monkeypatch.setattr(RowInserter, "write", write_then_lose_the_answer)
    writer = DecisionWriter(engine, queue_size=100, batch_size=64, spool=None)
    writer.start()
    try:
        for row in rows:
            assert writer.submit(row)
        assert writer.flush(10.0)
        assert lost
        assert writer.failed == 0
        assert writer.already_stored == len(rows)
        assert "refused" not in caplog.text
        assert len(_stored(tmp_path / "lost.db")) == len(rows)
        RowInserter(engine).write([other])  # stored by someone else, then a clash
        assert writer.submit(clash) and writer.flush(10.0)
        assert writer.failed == 1
        assert writer.already_stored == len(rows)
        assert f"decision {clash['id']} refused" in caplog.text
    finally:
        writer.stop()
        engine.dispose()
