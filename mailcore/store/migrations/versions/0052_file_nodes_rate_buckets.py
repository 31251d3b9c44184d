"""file_nodes: the nodes keeping files under `files_dir`, and the marker each wrote there;
rate_buckets: the rate limits that guard secrets, shared by the nodes.

Nodes sharing a PostgreSQL store kept safedrop's and the Mail API's files in their own data
directories: a file uploaded through one node could not be downloaded through another. Each
node now writes a marker file under its files directory and records it here; a node that
cannot read another's marker logs an error naming `files_dir` (mailcore.filenodes).

The limits that guard secrets (password logins per address, per account name and address,
per account name; a drop link's password guesses, one-time codes sent and replies) were token
buckets in each process's memory: N nodes allowed N times the guesses. They are now rows of
rate_buckets, taken from in one transaction by whichever node answers (mailcore.ratelimits).

Upgrade: both tables are made empty (each node records itself at its next start; every
bucket starts full). Downgrade: they go.

Revision ID: 0052_file_nodes_rate_buckets
Revises: 0051_drop_secrets_removed
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0052_file_nodes_rate_buckets"
down_revision = "0051_drop_secrets_removed"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "file_nodes",
        sa.Column("node_id", sa.String(255), primary_key=True),
        sa.Column("marker", sa.String(64), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "rate_buckets",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("full_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_rate_buckets_full_at", "rate_buckets", ["full_at"])


def downgrade() -> None:
    op.drop_index("ix_rate_buckets_full_at", table_name="rate_buckets")
    op.drop_table("rate_buckets")
    op.drop_table("file_nodes")
