"""The Mail API (seed 002): hosted mailboxes, access grants, their mail and attachments.

Revision ID: 0013_mailapi
Revises: 0012_safedrop
"""

import sqlalchemy as sa
from alembic import op

revision = "0013_mailapi"
down_revision = "0012_safedrop"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mailboxes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(254), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"], ["users.id"], name=op.f("fk_mailboxes_owner_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mailboxes")),
        sa.UniqueConstraint("address", name=op.f("uq_mailboxes_address")),
    )
    op.create_index("ix_mailboxes_owner_id", "mailboxes", ["owner_id"])

    op.create_table(
        "mailbox_grants",
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        *(
            sa.Column(name, sa.Boolean(), nullable=False, server_default="0")
            for name in (
                "allow_read", "allow_send", "allow_reply_to", "allow_delete", "allow_modify"
            )
        ),
        sa.ForeignKeyConstraint(
            ["mailbox_id"], ["mailboxes.id"],
            name=op.f("fk_mailbox_grants_mailbox_id_mailboxes"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_mailbox_grants_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("mailbox_id", "user_id", name=op.f("pk_mailbox_grants")),
    )
    op.create_index("ix_mailbox_grants_user_id", "mailbox_grants", ["user_id"])

    op.create_table(
        "mailapi_mail",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("public_id", sa.String(16), nullable=False),
        sa.Column("mailbox_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(8), nullable=False),
        sa.Column("read", sa.Boolean(), nullable=False, server_default="0"),
        *(
            sa.Column(name, sa.Text(), nullable=False, server_default="")
            for name in (
                "mail_from", "to_addrs", "cc_addrs", "bcc_addrs", "reply_to", "subject", "body"
            )
        ),
        sa.Column("raw", sa.LargeBinary(), nullable=True),
        sa.Column("queue_id", sa.String(32), nullable=True),
        sa.Column("queue_rcpt_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("sent_at", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["mailbox_id"], ["mailboxes.id"],
            name=op.f("fk_mailapi_mail_mailbox_id_mailboxes"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mailapi_mail")),
        sa.UniqueConstraint("public_id", name=op.f("uq_mailapi_mail_public_id")),
        sa.UniqueConstraint("queue_id", name=op.f("uq_mailapi_mail_queue_id")),
        sa.UniqueConstraint("queue_rcpt_id", name=op.f("uq_mailapi_mail_queue_rcpt_id")),
    )
    op.create_index("ix_mailapi_mail_mailbox_id", "mailapi_mail", ["mailbox_id", "id"])
    op.create_index("ix_mailapi_mail_status", "mailapi_mail", ["status", "mailbox_id", "id"])

    op.create_table(
        "mailapi_attachments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("mail_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("content_type", sa.String(255), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["mail_id"], ["mailapi_mail.id"],
            name=op.f("fk_mailapi_attachments_mail_id_mailapi_mail"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mailapi_attachments")),
    )
    op.create_index("ix_mailapi_attachments_mail_id", "mailapi_attachments", ["mail_id"])


def downgrade() -> None:
    op.drop_table("mailapi_attachments")
    op.drop_table("mailapi_mail")
    op.drop_table("mailbox_grants")
    op.drop_table("mailboxes")
