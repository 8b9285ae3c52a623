"""quality_defaults: a gateway call's default quality, provisional until a client's
quality replaces it or the tenant's wait is over

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # How long a successful gateway call's default quality (success_quality) waits for the
    # client's own quality before it is learned (service/quality_defaults.py).
    with op.batch_alter_table("gateway_settings", schema=None) as batch_op:
        batch_op.add_column(sa.Column("quality_wait_seconds", sa.Float(), nullable=False,
                                      server_default="300"))
        # A client (the LiteLLM plug-in) posts default qualities itself
        # (POST /v1/feedback default_quality): its qualities are checked against them.
        batch_op.add_column(sa.Column("records_defaults", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
    # One row per gateway call the router reported a quality for (tenants with
    # success_quality): "pending" (the default, learned at due_at unless replaced),
    # "replaced" (by the client's quality, event_id), "applying"/"applied" (the default
    # was learned), "final" (a failed call: the router's quality 0 stands).
    op.create_table(
        "quality_defaults",
        sa.Column("decision_id", sa.String(length=36), nullable=False),
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("quality", sa.Float(), nullable=True),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("event_id", sa.String(length=200), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("decision_id", name=op.f("pk_quality_defaults")),
    )
    op.create_index("ix_quality_defaults_state_due", "quality_defaults",
                    ["state", "due_at"])
    op.create_index("ix_quality_defaults_changed_at", "quality_defaults", ["changed_at"])


def downgrade() -> None:
    op.drop_index("ix_quality_defaults_changed_at", table_name="quality_defaults")
    op.drop_index("ix_quality_defaults_state_due", table_name="quality_defaults")
    op.drop_table("quality_defaults")
    with op.batch_alter_table("gateway_settings", schema=None) as batch_op:
        batch_op.drop_column("records_defaults")
        batch_op.drop_column("quality_wait_seconds")
