"""Domains: a log of which domains each raise of the change counter stood for.

Every node kept its RCPT snapshot fresh by reading every domain and every address again
whenever the `domains` change counter moved: one customer adding addresses (20 a second
within the API's rate) made every node read the whole deployment's lists 20 times a
second. `domain_changes` records, under the counter's new value, the ids of the domains a
change touched; a node that sees the counter move reads only those domains and their
addresses, and patches its snapshot.

Upgrade: the table, empty (a node holding a counter value from before it cannot find the
changes since in the log, and reloads everything once, as before). Downgrade: the table
goes (nodes of the older revision reload everything on each change).

Revision ID: 0031_domain_changes
Revises: 0030_drop_download_parts
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0031_domain_changes"
down_revision = "0030_drop_download_parts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "domain_changes",
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("domain_id", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("seq", "domain_id", name=op.f("pk_domain_changes")),
    )


def downgrade() -> None:
    op.drop_table("domain_changes")
