"""webhook_events: what a sync committed that its webhooks were not told yet.

A sync's webhook events (sync.completed, email.new, thread.updated) were written as delivery
rows only after the sync had committed its outcome, in transactions of their own: a crash or
a store error in between lost them, and the next sync did not see those e-mails as new. The
sync now records them here in the transactions that commit what they describe (each batch,
the outcome), and a transaction that writes their delivery rows deletes them
(mailcore.webhooks.events).

Upgrade: the table, empty, and its unique index (one pending row per account, event and
e-mail or thread). Downgrade: it goes, with any event not yet told.

Revision ID: 0059_webhook_events
Revises: 0058_api_sends
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0059_webhook_events"
down_revision = "0058_api_sends"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("ref_id", sa.Integer(), nullable=True),
        sa.Column("data", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"],
                                name=op.f("fk_webhook_events_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_events")),
    )
    op.create_index("ux_webhook_events_ref", "webhook_events",
                    ["account_id", "event", "ref_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_webhook_events_ref", table_name="webhook_events")
    op.drop_table("webhook_events")
