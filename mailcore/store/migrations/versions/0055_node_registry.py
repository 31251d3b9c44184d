"""nodes: one row per running node, replacing file_nodes and node_keys.

Each node recorded itself twice, through two services that each said it runs every ten
minutes: in `file_nodes` (its files marker, mailcore.filenodes) and in `node_keys` (a row
per key fingerprint, mailcore.nodekeys), with a row of one kept and the other's removed at
a clean stop. Now one service (mailcore.nodes) records each node once in `nodes`, with its
files marker and its key fingerprints, and checks both over the other nodes' rows.

Upgrade: the two tables go and `nodes` is made empty: what they held only said which nodes
ran lately and what they declared, and each node records itself again at its start (a node
still running the code before this revision logs its checks failing, its tables gone,
until it is upgraded too). Downgrade: `nodes` goes and the two tables come back empty,
as 0052 and 0054 made them.

Revision ID: 0055_node_registry
Revises: 0054_node_keys
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0055_node_registry"
down_revision = "0054_node_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_table("node_keys")
    op.drop_table("file_nodes")
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(255), primary_key=True),
        sa.Column("seen_at", sa.Float(), nullable=False),
        sa.Column("files_marker", sa.String(64), nullable=False),
        sa.Column("key_fingerprints", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("nodes")
    op.create_table(  # as 0052_file_nodes_rate_buckets made it
        "file_nodes",
        sa.Column("node_id", sa.String(255), primary_key=True),
        sa.Column("marker", sa.String(64), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
    )
    op.create_table(  # as 0054_node_keys made it
        "node_keys",
        sa.Column("node_id", sa.String(255), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("fingerprints", sa.String(1024), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
    )
