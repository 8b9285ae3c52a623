"""budget pools: the part of each tenant's budget leased to the API replicas

Revision ID: 0005
Revises: 0004_guard_tags
Create Date: 2026-12-03 06:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004_guard_tags"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per (tenant, budget period): what the replicas leased of the period's
    # budget (spent or still held by one of them), kept <= the budget by the one
    # UPDATE that leases (service/budget_lease.py). reconciled_usd is the reconciliation
    # (real minus predicted cost of the period's decisions) already folded into
    # granted_usd. period_key is "2026-12-03" (day) or "2026-12" (month).
    op.create_table(
        "budget_pools",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("period_key", sa.String(length=10), nullable=False),
        sa.Column("granted_usd", sa.Float(), nullable=False),
        sa.Column("last_grant_usd", sa.Float(), nullable=False),
        sa.Column("reconciled_usd", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("tenant_id", "period_key", name=op.f("pk_budget_pools")),
    )


def downgrade() -> None:
    op.drop_table("budget_pools")
