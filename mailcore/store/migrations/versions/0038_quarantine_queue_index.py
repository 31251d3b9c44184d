"""quarantine: an index on (queue_id, email), for keeping a message once per recipient.

A message filtered again after a crash (killed after its quarantine rows committed and
before the queue recorded them) was kept a second time; the keep now looks for the row of
the same queued message and recipient first, which without this index read every row held
for the address.

Upgrade: the index. Downgrade: it goes.

Revision ID: 0038_quarantine_queue_index
Revises: 0037_mailbox_domain_rows
"""

from __future__ import annotations

from alembic import op

revision = "0038_quarantine_queue_index"
down_revision = "0037_mailbox_domain_rows"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_quarantine_queue_id", "quarantine", ["queue_id", "email"])


def downgrade() -> None:
    op.drop_index("ix_quarantine_queue_id", table_name="quarantine")
