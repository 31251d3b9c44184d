"""file_nodes: the nodes keeping files under `files_dir`, and the marker each wrote there.

Nodes sharing a PostgreSQL store kept safedrop's and the Mail API's files in their own data
directories: a file uploaded through one node could not be downloaded through another. Each
node now writes a marker file under its files directory and records it here; a node that
cannot read another's marker logs an error naming `files_dir` (mailcore.filenodes).

Upgrade: the table is made empty (each node records itself at its next start). Downgrade:
it goes.

Revision ID: 0054_file_nodes
Revises: 0051_drop_secrets_removed
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0054_file_nodes"
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


def downgrade() -> None:
    op.drop_table("file_nodes")
