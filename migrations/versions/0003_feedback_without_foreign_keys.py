"""feedback without foreign keys (the learners write it; docs/streams.md)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 22:10:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # In distributed mode the learners insert every applied event into ``feedback``, in
    # the partition's transaction. PostgreSQL checks a foreign key with one trigger per
    # row (an index probe and a FOR KEY SHARE lock on the referenced row): the two
    # triggers took 40 of 68 ms for 3,333 rows (EXPLAIN ANALYZE on the test machine),
    # and one learner ran at 0.68 of its speed writing the rows with them
    # (benchmarks/results/learner_feedback_rows_fk.json). The keys guard nothing the
    # writers do not check already: both writers (service/ingest.py ``store_many`` and
    # the learner) read the decision and compare its tenant before they insert, the
    # decision's own foreign key holds its tenant, and decisions and tenants are never
    # deleted. UNIQUE (decision_id, event_id) and the tenant index stay: the first makes
    # feedback apply once, the second serves the isolated-tenant rebuild.
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_constraint("fk_feedback_decision_id_decisions", type_="foreignkey")
        batch_op.drop_constraint("fk_feedback_tenant_id_tenants", type_="foreignkey")


def downgrade() -> None:
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_foreign_key("fk_feedback_decision_id_decisions", "decisions",
                                    ["decision_id"], ["id"])
        batch_op.create_foreign_key("fk_feedback_tenant_id_tenants", "tenants",
                                    ["tenant_id"], ["id"])
