"""The MTA-STS policies of the domains the queue delivers to by MX (`mta_sts_policies`,
mailcore.queue.mtasts): one row per domain, its TXT id, mode, MX patterns, max_age, when it
was fetched and when it expires, shared by the nodes of one store.

Upgrade: the table, empty (each domain's policy is fetched at its next delivery), its
`expires_at` indexed (the hourly sweep of expired rows, mailcore.queue.mtasts.PolicySweeper).
Downgrade: it goes (the policies are fetched again; until then a downgrade attack on a domain
whose policy was cached is not noticed).

Revision ID: 0070_mta_sts_policies
Revises: 0069_ids_never_reused
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0070_mta_sts_policies"
down_revision = "0069_ids_never_reused"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mta_sts_policies",
        sa.Column("domain", sa.String(253), nullable=False),
        sa.Column("policy_id", sa.String(32), nullable=False),
        sa.Column("mode", sa.String(8), nullable=False),
        sa.Column("mx", sa.Text(), nullable=False),
        sa.Column("max_age", sa.Integer(), nullable=False),
        sa.Column("fetched_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("domain", name=op.f("pk_mta_sts_policies")),
    )
    op.create_index("ix_mta_sts_policies_expires_at", "mta_sts_policies", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_mta_sts_policies_expires_at", table_name="mta_sts_policies")
    op.drop_table("mta_sts_policies")
