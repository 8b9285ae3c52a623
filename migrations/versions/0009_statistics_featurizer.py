"""partition_statistics.featurizer: the featurizer spec the contexts were made with

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 12:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The learners record which featurizer made the contexts they summed (its spec, e.g.
    # "hashing-v1:dim=64,..."), and every learner and API replica refuses statistics of
    # another one: contexts of two featurizers mixed in one sum corrupt it silently
    # (issue 17). Nullable: statistics written before it were not recorded and are not
    # checked, as checkpoints without a spec are not.
    op.add_column("partition_statistics",
                  sa.Column("featurizer", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("partition_statistics", schema=None) as batch_op:
        batch_op.drop_column("featurizer")
