"""The mail queue: messages and per-recipient delivery state.

Revision ID: 0003_queue
Revises: 0002_domains
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_queue"
down_revision = "0002_domains"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "queue_messages",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("mail_from", sa.String(512), nullable=False),
        sa.Column("client_ip", sa.String(64), nullable=False, server_default=""),
        sa.Column("helo", sa.String(255), nullable=False, server_default=""),
        sa.Column("tls", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("done_at", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_queue_messages")),
    )
    op.create_index("ix_queue_messages_done_at", "queue_messages", ["done_at"])
    op.create_table(
        "queue_recipients",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.String(32), nullable=False),
        sa.Column("address", sa.String(512), nullable=False),
        sa.Column("domain_id", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float(), nullable=False),
        sa.Column("lease_owner", sa.String(128), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_hop", sa.String(300), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_id"], ["queue_messages.id"],
            name=op.f("fk_queue_recipients_message_id_queue_messages"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_queue_recipients")),
    )
    op.create_index("ix_queue_recipients_message_id", "queue_recipients", ["message_id"])
    op.create_index(
        "ix_queue_recipients_state_next", "queue_recipients", ["state", "next_attempt_at"]
    )
    op.create_index("ix_queue_recipients_lease_owner", "queue_recipients", ["lease_owner"])


def downgrade() -> None:
    op.drop_index("ix_queue_recipients_lease_owner", table_name="queue_recipients")
    op.drop_index("ix_queue_recipients_state_next", table_name="queue_recipients")
    op.drop_index("ix_queue_recipients_message_id", table_name="queue_recipients")
    op.drop_table("queue_recipients")
    op.drop_index("ix_queue_messages_done_at", table_name="queue_messages")
    op.drop_table("queue_messages")
