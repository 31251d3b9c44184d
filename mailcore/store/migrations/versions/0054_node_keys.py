"""node_keys: the fingerprints of each node's secret keys.

Nodes sharing a PostgreSQL store each made their own `pages.key`, `quarantine.key`,
`safedrop.key` and `fetch.key` at their first start: a page form, quarantine release link or
safedrop grant signed by one node was refused by another, and a secret one node encrypted
could not be decrypted by another, without a word at start. Each node now records here an
HMAC of a fixed label under each key (never the key) and logs an error when another node's
differs (mailcore.nodekeys).

Upgrade: the table is made empty (each node records itself at its next start). Downgrade:
it goes.

Revision ID: 0054_node_keys
Revises: 0053_mailbox_quota
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0054_node_keys"
down_revision = "0053_mailbox_quota"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "node_keys",
        sa.Column("node_id", sa.String(255), primary_key=True),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("fingerprints", sa.String(1024), nullable=False),
        sa.Column("seen_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("node_keys")
