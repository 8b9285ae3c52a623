"""quality_defaults: a gateway failure's final row written before this version names
the gateway's outcome event when that outcome is stored

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-04 17:20:00
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Before this version a ``final`` row (a failed call's quality 0) could carry a NULL
    # event id: the gateway's own failures always, a client gateway's (the LiteLLM
    # plug-in's ``failed``) before it kept the failure's event. The service now writes
    # "gateway" (the event the router posts the failure's outcome with) on its own, and
    # takes a NULL row for a client gateway's failure buffered before the upgrade: the
    # first drained quality equal to the row's is its own (service/quality_defaults.py).
    # Rows whose gateway outcome is stored are the gateway's: marked so here, a client's
    # buffered rating of the call is then refused as before. Plain SQL: offline too.
    op.execute("UPDATE quality_defaults SET event_id = 'gateway' WHERE state = 'final'"
               " AND event_id IS NULL AND EXISTS (SELECT 1 FROM feedback WHERE"
               " feedback.decision_id = quality_defaults.decision_id"
               " AND feedback.event_id = 'gateway')")


def downgrade() -> None:
    # The older service compares event ids; NULL again is what it wrote.
    op.execute("UPDATE quality_defaults SET event_id = NULL WHERE state = 'final'"
               " AND event_id = 'gateway'")
