"""guard_changes: every change of a decision's guard part, for incremental guard rebuilds

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03 15:30:00
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Distributed mode only (PostgreSQL): API replicas rebuilt a guarded tenant's
    # account from ALL of its guarded decisions every <= 2 s (issue 17). A trigger on
    # ``decisions`` now logs each change of ``decisions.guard`` as a delta (the
    # decision's record, its reward before and after, whether it was counted before and
    # after), whoever makes it (an API replica's decision writer, a learner's update of
    # the outcome, the embedded ingest), and the replicas read only the changes past
    # their watermark (service/guards.py, ``GuardFollower``). The watermark is the
    # writing transaction's id (``xid``, 64 bits, never wraps): every transaction below
    # a snapshot's ``xmin`` has ended, so a reader that re-reads from the xmin of its
    # last read (skipping the ids it applied) misses no change that commits late.
    # SQLite (embedded mode) rebuilds accounts only at start and needs none of this.
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("""
        CREATE TABLE guard_changes (
            id bigserial PRIMARY KEY,
            xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
            at timestamptz NOT NULL DEFAULT now(),
            tenant_id varchar(200) NOT NULL,
            decision_id varchar(36) NOT NULL,
            decision_at timestamptz NOT NULL,
            record json NOT NULL,
            counted_before boolean NOT NULL,
            reward_before float8,
            counted_after boolean NOT NULL,
            reward_after float8
        )""")
    op.execute("CREATE INDEX ix_guard_changes_xid ON guard_changes (xid)")
    op.execute("CREATE INDEX ix_guard_changes_at ON guard_changes (at)")
    op.execute("""
        CREATE FUNCTION log_guard_change() RETURNS trigger LANGUAGE plpgsql AS $$
        DECLARE
            before_guard json;
            after_guard json;
        BEGIN
            IF TG_OP <> 'INSERT' THEN before_guard := OLD.guard; END IF;
            IF TG_OP <> 'DELETE' THEN after_guard := NEW.guard; END IF;
            -- The ORM writes an unguarded decision's guard as JSON null: no guard part.
            IF json_typeof(before_guard) = 'null' THEN before_guard := NULL; END IF;
            IF json_typeof(after_guard) = 'null' THEN after_guard := NULL; END IF;
            IF before_guard IS NULL AND after_guard IS NULL THEN RETURN NULL; END IF;
            IF TG_OP = 'DELETE' THEN NEW := OLD; END IF;
            INSERT INTO guard_changes (tenant_id, decision_id, decision_at, record,
                counted_before, reward_before, counted_after, reward_after)
            VALUES (NEW.tenant_id, NEW.id, NEW.created_at,
                coalesce(after_guard, before_guard) -> 'record',
                before_guard IS NOT NULL, (before_guard ->> 'reward')::float8,
                after_guard IS NOT NULL, (after_guard ->> 'reward')::float8);
            RETURN NULL;
        END $$""")
    # Only rows with a guard part fire it: unguarded decisions pay one WHEN test.
    op.execute("""
        CREATE TRIGGER decisions_guard_insert AFTER INSERT ON decisions
        FOR EACH ROW WHEN (json_typeof(NEW.guard) = 'object')
        EXECUTE FUNCTION log_guard_change()""")
    op.execute("""
        CREATE TRIGGER decisions_guard_update AFTER UPDATE OF guard ON decisions
        FOR EACH ROW EXECUTE FUNCTION log_guard_change()""")
    op.execute("""
        CREATE TRIGGER decisions_guard_delete AFTER DELETE ON decisions
        FOR EACH ROW WHEN (json_typeof(OLD.guard) = 'object')
        EXECUTE FUNCTION log_guard_change()""")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for name in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER IF EXISTS decisions_guard_{name} ON decisions")
    op.execute("DROP FUNCTION IF EXISTS log_guard_change()")
    op.execute("DROP TABLE IF EXISTS guard_changes")
