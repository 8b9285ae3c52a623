"""Alembic migrations: the same scripts up and down on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import inspect

from service.db.engine import downgrade, is_at_head, make_engine, upgrade
from service.db.models import Base

TABLES = {"admin_keys", "tenants", "models", "decisions", "feedback", "policy_checkpoints",
          "policy_snapshots", "gateway_settings", "quality_defaults"}


def test_upgrade_schema_matches_models(new_database_url):
    url = new_database_url()
    upgrade(url)
    engine = make_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert TABLES <= tables
        assert set(Base.metadata.tables) == TABLES
        assert is_at_head(engine)
        uniques = inspect(engine).get_unique_constraints("feedback")
        assert any(sorted(u["column_names"]) == ["decision_id", "event_id"] for u in uniques)
    finally:
        engine.dispose()


def test_downgrade_base_then_upgrade_again(new_database_url):
    url = new_database_url()
    upgrade(url)
    downgrade(url, "base")
    engine = make_engine(url)
    try:
        assert not TABLES & set(inspect(engine).get_table_names())
        assert not is_at_head(engine)
        upgrade(url)
        assert TABLES <= set(inspect(engine).get_table_names())
        assert is_at_head(engine)
    finally:
        engine.dispose()


def test_upgrade_feedback_without_foreign_keys_downgrade_restores_them(new_database_url):
    # 0003: the learners insert feedback rows; the per-row key checks were most of it.
    url = new_database_url()
    upgrade(url)

    def referred() -> list[str]:
        engine = make_engine(url)
        try:
            return sorted(fk["referred_table"] for fk in inspect(engine).get_foreign_keys(
                "feedback"))
        finally:
            engine.dispose()

    assert referred() == []
    downgrade(url, "0002")
    assert referred() == ["decisions", "tenants"]
    upgrade(url)
    assert referred() == []
    engine = make_engine(url)
    try:
        uniques = inspect(engine).get_unique_constraints("feedback")
        assert any(sorted(u["column_names"]) == ["decision_id", "event_id"] for u in uniques)
        assert ["tenant_id"] in [ix["column_names"]
                                 for ix in inspect(engine).get_indexes("feedback")]
    finally:
        engine.dispose()


def test_downgrade_learner_writes_keeps_keys_in_learner_applied(new_database_url):
    # 0007: a feedback row naming a learners' group is that group's idempotency key;
    # going down, the keys move to learner_applied, or the old learner would apply
    # those events again.
    from datetime import UTC, datetime

    from sqlalchemy import text

    url = new_database_url()
    upgrade(url)
    now = datetime.now(UTC)
    engine = make_engine(url)

    def fillfactor() -> list[str]:
        with engine.connect() as conn:
            options = conn.execute(text("SELECT reloptions FROM pg_class"
                                        " WHERE relname = 'decisions'")).scalar()
        return [o for o in options or [] if o.startswith("fillfactor")]

    postgres = engine.dialect.name == "postgresql"
    try:
        if postgres:  # the reconciled cost's UPDATE stays on the page (HOT)
            assert fillfactor() == ["fillfactor=75"]
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO feedback (decision_id, tenant_id, event_id, quality,"
                " created_at, learner_group) VALUES (:d, 't', :e, 0.5, :now, :g)"),
                [{"d": "d1", "e": "e1", "now": now, "g": "group-a"},
                 {"d": "d2", "e": "", "now": now, "g": None}])
    finally:
        engine.dispose()
    downgrade(url, "0006")
    engine = make_engine(url)
    try:
        assert "learner_group" not in {c["name"] for c in inspect(engine).get_columns(
            "feedback")}
        with engine.connect() as conn:
            keys = conn.execute(text("SELECT group_id, decision_id, event_id"
                                     " FROM learner_applied")).all()
        assert [tuple(k) for k in keys] == [("group-a", "d1", "e1")]
        if postgres:
            assert fillfactor() == []
        upgrade(url)
        assert is_at_head(engine)
    finally:
        engine.dispose()


def test_upgrade_statistics_lz4_downgrade_back_to_external(new_database_url):
    # 0012: the learners rewrite each partition's statistics (~2.2 MB at d=64) every
    # batch; lz4 costs PostgreSQL less CPU than writing them uncompressed (0002).
    import pytest
    from sqlalchemy import text

    url = new_database_url()
    upgrade(url)
    engine = make_engine(url)

    def storage() -> tuple[str, str]:
        with engine.connect() as conn:
            row = conn.execute(text(
                "SELECT attstorage, attcompression FROM pg_attribute WHERE attrelid ="
                " 'partition_statistics'::regclass AND attname = 'data'")).one()
        return str(row[0]), str(row[1])

    try:
        if engine.dialect.name != "postgresql":
            pytest.skip("a PostgreSQL storage option (SQLite has no TOAST)")
        with engine.connect() as conn:
            lz4 = conn.execute(text("SELECT 'lz4' = ANY(enumvals) FROM pg_settings"
                                    " WHERE name = 'default_toast_compression'")).scalar()
        if not lz4:
            pytest.skip("this PostgreSQL has no lz4 (0012 keeps 0002's storage)")
        assert storage() == ("x", "l")  # extended (compressed), lz4
        downgrade(url, "0011")
        assert storage() == ("e", "")  # external, uncompressed, as 0002 left it
        upgrade(url)
        assert storage() == ("x", "l")
    finally:
        engine.dispose()


def test_statistics_lz4_offline_sql(capsys):
    """``alembic upgrade 0011:0012 --sql`` (a script for a DBA, no connection): the lz4
    check is the server's, in the script. Before, 0012 queried the connection, which
    offline mode has not (AttributeError: exec_driver_sql)."""
    from alembic import command

    from service.db.engine import alembic_config

    cfg = alembic_config("postgresql+psycopg://nobody@127.0.0.1:9/none")
    for run, revisions in ((command.upgrade, "0011:0012"), (command.downgrade, "0012:0011")):
        run(cfg, revisions, sql=True)
        script = capsys.readouterr().out
        assert "'lz4' = ANY(enumvals)" in script and "COMPRESSION" in script, script


def test_upgrade_model_added_late_defaults_false_offline_too(new_database_url, capsys):
    # 0013: models.added_late (a model registered after the first decision); models
    # registered before it count as from the start.
    from alembic import command
    from sqlalchemy import text

    from service.db.engine import alembic_config

    url = new_database_url()
    upgrade(url, "0012")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO models (name, input_price_per_mtok, output_price_per_mtok,"
                " enabled, created_at, updated_at) VALUES ('old', 1, 2, true, :t, :t)"),
                {"t": "2026-12-01 00:00:00+00:00"})
        upgrade(url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT added_late FROM models")).scalar() in (False, 0)
        downgrade(url, "0012")
        assert "added_late" not in {c["name"] for c in inspect(engine).get_columns("models")}
        upgrade(url)
        assert is_at_head(engine)
    finally:
        engine.dispose()
    # Offline (`alembic upgrade --sql`): no reflection, one ALTER.
    capsys.readouterr()
    command.upgrade(alembic_config(url), "0012:0013", sql=True)
    assert "ALTER TABLE models ADD COLUMN added_late BOOLEAN" in capsys.readouterr().out


def test_upgrade_marks_the_gateways_own_failure_rows(new_database_url):
    # 0014: a final row written before it has a NULL event id; the gateway's own (its
    # outcome stored with event "gateway") are marked so, a client gateway's stays NULL
    # (the drain takes it as the buffered failure's own: tests/gateway).
    from sqlalchemy import text

    url = new_database_url()
    upgrade(url, "0013")
    engine = make_engine(url)
    t = "2026-12-01 00:00:00+00:00"
    try:
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO quality_defaults (decision_id, tenant_id, state, quality,"
                " event_id, changed_at) VALUES (:d, 't', :s, 0, NULL, :t)"),
                [{"d": "own", "s": "final", "t": t}, {"d": "plugin", "s": "final", "t": t},
                 {"d": "waiting", "s": "pending", "t": t}])
            conn.execute(text(
                "INSERT INTO feedback (decision_id, tenant_id, event_id, quality,"
                " created_at) VALUES (:d, 't', 'gateway', 0, :t)"),
                [{"d": "own", "t": t}, {"d": "waiting", "t": t}])
        upgrade(url)

        def events() -> dict[str, str | None]:
            with engine.connect() as conn:
                return dict(conn.execute(text(  # type: ignore[arg-type]
                    "SELECT decision_id, event_id FROM quality_defaults")).all())

        assert events() == {"own": "gateway", "plugin": None, "waiting": None}
        downgrade(url, "0013")
        assert events() == {"own": None, "plugin": None, "waiting": None}
    finally:
        engine.dispose()
