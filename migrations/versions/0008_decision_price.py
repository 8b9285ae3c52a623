"""decisions.price_usd: the chosen model's price estimate, for the learners

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 10:50:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The price estimate (USD: declared prices x the request's tokens) the decision used
    # for the model it chose. With the reported cost it teaches that model's price
    # correction; the Kafka learners read it here instead of parsing the predictions JSON
    # (issue 17). Nullable without a default: PostgreSQL adds it without rewriting the
    # table, SQLite without copying it; older decisions have none and teach no ratio.
    op.add_column("decisions", sa.Column("price_usd", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("decisions", schema=None) as batch_op:
        batch_op.drop_column("price_usd")
