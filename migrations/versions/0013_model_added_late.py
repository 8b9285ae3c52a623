"""models.added_late: whether a model was registered after the first decision (its cold
start is counted per tag value, cold_start_by="added-on-tags")

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04 14:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Stored with the model, so every policy built from the registry (a restart, a
    # rebuilt isolated tenant, a distributed decider's snapshot) knows it. Models
    # registered before this revision count as from the start (false): a checkpoint's
    # own late flags still apply to them.
    # A plain ADD COLUMN (SQLite has it, with a default): no table copy, and no
    # reflection, so `alembic upgrade --sql` renders it too.
    op.add_column("models", sa.Column("added_late", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("added_late")
