"""Engine construction and migrations, shared by the app, the CLI and the tests."""

from __future__ import annotations

from pathlib import Path

import orjson
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

__all__ = ["make_engine", "alembic_config", "upgrade", "downgrade", "is_at_head"]

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
#: libpq connection parameters for PostgreSQL (see make_engine): give up connecting
#: after 5 s; probe an idle connection after 10 s, every 5 s, 3 times; fail a write
#: that the server has not acknowledged within 15 s.
PG_CONNECT_DEFAULTS = {"connect_timeout": 5, "keepalives": 1, "keepalives_idle": 10,
                       "keepalives_interval": 5, "keepalives_count": 3,
                       "tcp_user_timeout": 15_000}


def _dumps(value: object) -> str:
    # orjson: the decision writer serializes every candidate's predictions, and the
    # standard library's float formatting was most of the writer's time.
    return orjson.dumps(value).decode()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL, a busy timeout and foreign keys."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        # The decision writer, feedback and admin requests write from different threads:
        # wait for the lock (30 s) instead of failing with "database is locked".
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               json_serializer=_dumps)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # pragma: no cover - glue
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # A server that vanishes without closing connections (a network partition, a host
    # gone) must show up as an error within seconds, not the OS's TCP timeouts (minutes):
    # the feedback buffer and /readyz's "degraded" depend on an error to act on. Values
    # in the URL's query win over these.
    defaults = {key: value for key, value in PG_CONNECT_DEFAULTS.items()
                if key not in parsed.query}
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10,
                         json_serializer=_dumps, connect_args=defaults)


def alembic_config(url: str) -> Config:
    """An alembic configuration for ``url`` that needs no alembic.ini on disk."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


def is_at_head(engine: Engine) -> bool:
    """True when the database's alembic revision is the newest one."""
    heads = set(ScriptDirectory.from_config(alembic_config("")).get_heads())
    with engine.connect() as conn:
        current = set(MigrationContext.configure(conn).get_current_heads())
    return current == heads
