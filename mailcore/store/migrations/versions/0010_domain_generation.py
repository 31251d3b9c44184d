"""A change counter for the served domains, so that every node sees a change at once.

`domain_generation` holds one row (id 1). DomainService raises its `generation` in the same
transaction as each change to `domains` or `domain_addresses`; the daemon polls it (one
primary-key read, `[domains] poll_interval`) and reloads its RCPT snapshot when it moved.

Revision ID: 0010_domain_generation
Revises: 0009_credential_parent
"""

import sqlalchemy as sa
from alembic import op

revision = "0010_domain_generation"
down_revision = "0009_credential_parent"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "domain_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_domain_generation")),
    )
    op.bulk_insert(table, [{"id": 1, "generation": 0}])


def downgrade() -> None:
    op.drop_table("domain_generation")
