"""learners' writes: feedback.learner_group (the row is the group's key), decisions
fillfactor 75 (the reconciled cost is a HOT update)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 09:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A learner that writes feedback rows wrote every applied event twice: a
    # ``learner_applied`` key and a ``feedback`` row, each with its unique index, about
    # a third of PostgreSQL's work per event (docs/streams.md, "Exactly-once effect").
    # The feedback row now records the consumer group that applied it, and for that
    # group it IS the key: UNIQUE (decision_id, event_id) already refuses a second row.
    # ``learner_applied`` is only written for events whose row another group (or the
    # embedded mode, NULL here) wrote first. No index: the column is read only for
    # those, through the unique index. Nullable, no default: adding it rewrites nothing.
    op.add_column("feedback", sa.Column("learner_group", sa.String(length=200),
                                        nullable=True))
    if op.get_bind().dialect.name == "postgresql":
        # The learners write each decision's real cost into its row (charged_usd, the
        # budgets' spend): an UPDATE of a ~0.8 kB row. With full pages the new version
        # goes to another page and every index of the table gets an entry (20 us of
        # PostgreSQL CPU per event, 60% of the learners' write statement); with room on
        # the page it is a HOT update (no index entry, the old version pruned in place):
        # 13 us at 75, 8 us at 50 (docs/streams.md, "Measured"). A table whose rows are
        # each updated once needs that room anyway, or it bloats until vacuum. Only
        # pages written from now on leave it.
        op.execute("ALTER TABLE decisions SET (fillfactor = 75)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE decisions RESET (fillfactor)")
    # The rows' keys move back into learner_applied first, or a downgraded learner would
    # apply every event of its group again.
    op.execute(
        "INSERT INTO learner_applied (group_id, decision_id, event_id, applied_at)"
        " SELECT learner_group, decision_id, event_id, created_at FROM feedback"
        " WHERE learner_group IS NOT NULL"
        " ON CONFLICT (group_id, decision_id, event_id) DO NOTHING")
    op.drop_column("feedback", "learner_group")
