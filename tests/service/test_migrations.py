"""Alembic migrations: the same scripts up and down on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import inspect

from service.db.engine import downgrade, is_at_head, make_engine, upgrade
from service.db.models import Base

TABLES = {"admin_keys", "tenants", "models", "decisions", "feedback", "policy_checkpoints",
          "policy_snapshots"}


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
