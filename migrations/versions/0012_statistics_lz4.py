"""partition_statistics.data compressed with lz4 (the learners rewrite it every batch)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04 10:50:00
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def _if_lz4(alter: str) -> None:
    """``ALTER TABLE partition_statistics`` + ``alter`` when the server has lz4 (PostgreSQL
    14+ built with it, as Debian's is, lists it; older servers have no row), decided by the
    server: in the statement, so that ``alembic upgrade --sql`` writes it out too."""
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_settings WHERE name ="  # noqa: S608
               " 'default_toast_compression' AND 'lz4' = ANY(enumvals)) THEN EXECUTE"
               f" 'ALTER TABLE partition_statistics {alter}'; END IF; END $$")


def upgrade() -> None:
    # Every learner transaction rewrites its partition's statistics: ~2.2 MB of sums per
    # key at d=64 and 16 models. Migration 0002 stored them out of line uncompressed
    # (pglz spent more than it saved). lz4 is another matter: on the test machine a
    # 2.2 MB upsert took 6.4 ms of PostgreSQL CPU against 11.0 uncompressed (and 25.6
    # with pglz), the value shrank to 0.5 MB (a quarter of the WAL and of the TOAST
    # rows), and a decider's read of it 5.1 ms against 4.6
    # (benchmarks/learner_write_profile.py; docs/streams.md "Measured"). Rows keep the
    # form they were written in until rewritten (readers take either); a server without
    # lz4 keeps 0002's storage.
    _if_lz4("ALTER COLUMN data SET STORAGE EXTENDED, ALTER COLUMN data SET COMPRESSION lz4")


def downgrade() -> None:
    _if_lz4("ALTER COLUMN data SET STORAGE EXTERNAL,"
            " ALTER COLUMN data SET COMPRESSION default")
