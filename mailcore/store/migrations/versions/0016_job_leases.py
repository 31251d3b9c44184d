"""Leases shared by the nodes of one store: named background jobs and account syncs.

`job_leases` holds one row per job that must run on one node at a time (quarantine digests,
domain verification passes): the node that runs it and until when. `fetch_accounts` gains
`lease_owner`/`lease_until`: the node syncing the account, so that no two nodes sync one
account at once.

Revision ID: 0016_job_leases
Revises: 0015_safedrop_access
"""

import sqlalchemy as sa
from alembic import op

revision = "0016_job_leases"
down_revision = "0015_safedrop_access"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_leases",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("until", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_job_leases")),
    )
    with op.batch_alter_table("fetch_accounts") as batch:
        batch.add_column(sa.Column("lease_owner", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fetch_accounts") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("lease_owner")
    op.drop_table("job_leases")
