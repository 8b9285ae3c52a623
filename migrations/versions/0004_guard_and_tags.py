"""guarded exploration (tenant baseline and bound) and request tags on decisions

Revision ID: 0004_guard_tags
Revises: 0003
Create Date: 2026-12-03 06:15:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_guard_tags"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable or defaulted columns only: existing tenants get no guard, existing
    # decisions no tags, and nothing learned changes.
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("baseline_model", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("max_exploration_loss", sa.Float(), nullable=False,
                                      server_default="0.02"))
        batch_op.add_column(sa.Column("guard_since", sa.DateTime(timezone=True),
                                      nullable=True))
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("tags", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("guard", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.drop_column("guard")
        batch_op.drop_column("tags")
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("guard_since")
        batch_op.drop_column("max_exploration_loss")
        batch_op.drop_column("baseline_model")
