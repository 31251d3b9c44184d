"""safedrop: when the sender was last told that a recipient opened the drop.

With email_receipt_when=1 ("each time a recipient opens the drop") every GET of the link
mailed the sender: whoever held a link could flood them. `opened_receipt_at` lets the
recipient's side send at most one such receipt per recipient an hour.

Upgrade: the column (none told yet: the next opening is told). Downgrade: it goes.

Revision ID: 0033_drop_open_receipts
Revises: 0032_drop_code_failures
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0033_drop_open_receipts"
down_revision = "0032_drop_code_failures"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drop_recipients") as batch:
        batch.add_column(
            sa.Column("opened_receipt_at", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("drop_recipients") as batch:
        batch.drop_column("opened_receipt_at")
