"""api_sends: the mail the APIs sent for each user, for the per-user caps on recipients.

A user of the Mail API (outbox) or of safedrop (a bundle's notifications) could send mail
to any address as fast as the request rate allowed (20 a second): a stolen credential sent
spam through the gateway's address. Each send is now recorded here (user, time, number of
recipients) in the transaction that sends, and one that would take the user past `[limits]
user_recipients_per_hour` or `user_recipients_per_day` is refused (mailcore.sendcaps).

Upgrade: the table, empty (sends before it count for nothing), and its indexes.
Downgrade: it goes.

Revision ID: 0058_api_sends
Revises: 0057_mailapi_gone
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0058_api_sends"
down_revision = "0057_mailapi_gone"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_sends",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("recipients", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"],
                                name=op.f("fk_api_sends_user_id_users"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_sends")),
    )
    op.create_index("ix_api_sends_user_id_at", "api_sends", ["user_id", "at", "recipients"])
    op.create_index("ix_api_sends_at", "api_sends", ["at"])


def downgrade() -> None:
    op.drop_index("ix_api_sends_at", table_name="api_sends")
    op.drop_index("ix_api_sends_user_id_at", table_name="api_sends")
    op.drop_table("api_sends")
