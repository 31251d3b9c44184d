"""mailboxes.quota_bytes: one mailbox's own quota, set by the operator.

Every mailbox had `[mailapi] mailbox_quota_bytes` (1 GiB by default) and nothing else: an
operator could not give one mailbox more room (a shared team mailbox) or less, nor lift the
limit for one, without changing it for all. `quota_bytes` is that mailbox's own limit in
bytes (`mailcore mailbox quota`): NULL follows `[mailapi] mailbox_quota_bytes`, 0 is no
limit (mailcore.mailapi.counts).

Upgrade: the column, NULL in every row (each mailbox keeps the configured limit). Downgrade:
the column goes (every mailbox follows the configured limit again).

Revision ID: 0053_mailbox_quota
Revises: 0052_file_nodes_rate_buckets
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0053_mailbox_quota"
down_revision = "0052_file_nodes_rate_buckets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mailboxes") as batch:
        batch.add_column(sa.Column("quota_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mailboxes") as batch:
        batch.drop_column("quota_bytes")
