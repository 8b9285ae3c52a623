"""upstreams of registered models, and each tenant's gateway settings

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 09:10:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Where POST /v1/chat/completions forwards a model's requests (service/gateway). The
    # key is never stored: api_key_env names the environment variable that holds it.
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("base_url", sa.String(length=2000), nullable=True))
        batch_op.add_column(sa.Column("upstream_model", sa.String(length=200),
                                      nullable=True))
        batch_op.add_column(sa.Column("api_key_env", sa.String(length=200), nullable=True))
    # One row per tenant that changed a gateway setting (no row: the defaults): its model
    # aliases ("auto:<name>" -> preferences and candidates), fallback attempts, and the
    # quality reported for a successful call.
    op.create_table(
        "gateway_settings",
        sa.Column("tenant_id", sa.String(length=36), nullable=False),
        sa.Column("aliases", sa.JSON(), nullable=False),
        sa.Column("fallback_attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("success_quality", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"],
                                name=op.f("fk_gateway_settings_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_gateway_settings")),
    )


def downgrade() -> None:
    op.drop_table("gateway_settings")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_column("api_key_env")
        batch_op.drop_column("upstream_model")
        batch_op.drop_column("base_url")
