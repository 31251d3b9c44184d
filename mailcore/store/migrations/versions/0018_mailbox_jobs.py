"""Migrate and restore jobs (issue 13): `mailbox_jobs` (one row per job: kind, status and
reason, the destination's server, encrypted login and TLS trust, live progress, retry time) and
`mailbox_job_items` (what a job wrote or found of each backed-up message: inflight, done
with the destination's UID, or present).

Revision ID: 0018_mailbox_jobs
Revises: 0017_backup_attachments
"""

import sqlalchemy as sa
from alembic import op

revision = "0018_mailbox_jobs"
down_revision = "0017_backup_attachments"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mailbox_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(8), nullable=False, server_default="queued"),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("phase", sa.String(8), nullable=False, server_default="backup"),
        sa.Column("email", sa.String(254), nullable=False, server_default=""),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("protocol", sa.String(8), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("use_ssl", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("start_tls", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("allow_cleartext", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("username", sa.String(255), nullable=True),
        sa.Column("password_enc", sa.LargeBinary(), nullable=True),
        sa.Column("tls_ca_pem", sa.Text(), nullable=True),
        sa.Column("tls_fingerprint", sa.String(64), nullable=True),
        sa.Column("downloaded", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("messages", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("appended", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("restore_size", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("next_attempt_at", sa.Float(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("start_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("end_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_mailbox_jobs_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["fetch_accounts.id"],
            name=op.f("fk_mailbox_jobs_account_id_fetch_accounts"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_mailbox_jobs")),
    )
    op.create_index("ix_mailbox_jobs_status_next", "mailbox_jobs",
                    ["status", "next_attempt_at"])
    op.create_index("ix_mailbox_jobs_account_kind", "mailbox_jobs", ["account_id", "kind"])
    op.create_table(
        "mailbox_job_items",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("message_row_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(8), nullable=False),
        sa.Column("dest_uidvalidity", sa.BigInteger(), nullable=True),
        sa.Column("dest_uid", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["mailbox_jobs.id"],
            name=op.f("fk_mailbox_job_items_job_id_mailbox_jobs"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["message_row_id"], ["messages.id"],
            name=op.f("fk_mailbox_job_items_message_row_id_messages"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "message_row_id", name=op.f("pk_mailbox_job_items")),
    )
    op.create_index("ix_mailbox_job_items_message_row_id", "mailbox_job_items",
                    ["message_row_id"])


def downgrade() -> None:
    op.drop_table("mailbox_job_items")
    op.drop_table("mailbox_jobs")
