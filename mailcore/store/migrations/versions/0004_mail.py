"""Fetch accounts and folders, the message store, threads and the full-text index.

Revision ID: 0004_mail
Revises: 0003_queue
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_mail"
down_revision = "0003_queue"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fetch_accounts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(255), nullable=False, server_default=""),
        sa.Column("email", sa.String(254), nullable=False, server_default=""),
        sa.Column("protocol", sa.String(8), nullable=False, server_default="imap"),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("username", sa.String(255), nullable=False),
        sa.Column("password_enc", sa.LargeBinary(), nullable=False),
        sa.Column("use_ssl", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("start_tls", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("allow_cleartext", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("tls_ca_pem", sa.Text(), nullable=True),
        sa.Column("tls_fingerprint", sa.String(64), nullable=True),
        sa.Column("sync_limit_type", sa.String(8), nullable=False, server_default="all"),
        sa.Column("sync_limit_value", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("folders_to_sync", sa.Text(), nullable=False, server_default=""),
        sa.Column("exclude_trash", sa.Boolean(), nullable=False, server_default="1"),
        sa.Column("sync_interval", sa.Integer(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False, server_default="1"),
        sa.Column("last_sync", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sync_status", sa.String(16), nullable=False, server_default="never"),
        sa.Column("sync_error", sa.Text(), nullable=True),
        sa.Column("sync_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("progress_folder", sa.String(1024), nullable=True),
        sa.Column("progress_done", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("progress_total", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_fetch_accounts_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fetch_accounts")),
    )
    op.create_index("ix_fetch_accounts_user_id", "fetch_accounts", ["user_id"])

    op.create_table(
        "fetch_folders",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(1024), nullable=False),
        sa.Column("delimiter", sa.String(4), nullable=True),
        sa.Column("special_use", sa.String(32), nullable=True),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=True),
        sa.Column("uidnext", sa.BigInteger(), nullable=True),
        sa.Column("highestmodseq", sa.BigInteger(), nullable=True),
        sa.Column("exists_on_server", sa.Boolean(), nullable=False, server_default="1"),
        sa.Column("last_sync", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sync_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["account_id"], ["fetch_accounts.id"],
            name=op.f("fk_fetch_folders_account_id_fetch_accounts"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fetch_folders")),
        sa.UniqueConstraint("account_id", "name", name="uq_fetch_folders_account_name"),
    )

    op.create_table(
        "message_blobs",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_message_blobs")),
    )

    op.create_table(
        "threads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("subject_key", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_threads_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_threads")),
    )
    op.create_index("ix_threads_user_subject", "threads", ["user_id", "subject_key"])

    op.create_table(
        "messages",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=True),
        sa.Column("folder_id", sa.Integer(), nullable=True),
        sa.Column("folder", sa.String(1024), nullable=False, server_default="INBOX"),
        sa.Column("uidvalidity", sa.BigInteger(), nullable=True),
        sa.Column("uid", sa.BigInteger(), nullable=True),
        sa.Column("pop_uidl", sa.String(255), nullable=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("flags", sa.Text(), nullable=False, server_default=""),
        sa.Column("internal_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("on_server", sa.Boolean(), nullable=False, server_default="1"),
        sa.Column("message_id", sa.String(998), nullable=False, server_default=""),
        sa.Column("subject", sa.Text(), nullable=False, server_default=""),
        sa.Column("sender", sa.Text(), nullable=False, server_default=""),
        sa.Column("sender_address", sa.String(320), nullable=False, server_default=""),
        sa.Column("recipient", sa.Text(), nullable=False, server_default=""),
        sa.Column("cc", sa.Text(), nullable=False, server_default=""),
        sa.Column("date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("body_text", sa.Text(), nullable=False, server_default=""),
        sa.Column("body_html", sa.Text(), nullable=False, server_default=""),
        sa.Column("headers", sa.Text(), nullable=False, server_default=""),
        sa.Column("in_reply_to", sa.String(998), nullable=False, server_default=""),
        sa.Column("references", sa.Text(), nullable=False, server_default=""),
        sa.Column("has_attachments", sa.Boolean(), nullable=False, server_default="0"),
        sa.Column("parse_problems", sa.Text(), nullable=False, server_default=""),
        sa.Column("thread_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_messages_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["fetch_accounts.id"],
            name=op.f("fk_messages_account_id_fetch_accounts"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["folder_id"], ["fetch_folders.id"],
            name=op.f("fk_messages_folder_id_fetch_folders"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["sha256"], ["message_blobs.sha256"],
            name=op.f("fk_messages_sha256_message_blobs"),
        ),
        sa.ForeignKeyConstraint(
            ["thread_id"], ["threads.id"], name=op.f("fk_messages_thread_id_threads"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint("folder_id", "uidvalidity", "uid", name="uq_messages_folder_uid"),
        sa.UniqueConstraint("folder_id", "pop_uidl", name="uq_messages_folder_uidl"),
    )
    op.create_index("ix_messages_user_date", "messages", ["user_id", "date"])
    op.create_index("ix_messages_account_folder", "messages", ["account_id", "folder"])
    op.create_index("ix_messages_thread_id", "messages", ["thread_id"])
    op.create_index("ix_messages_user_message_id", "messages", ["user_id", "message_id"])
    op.create_index("ix_messages_sha256", "messages", ["sha256"])

    op.create_table(
        "message_refs",
        sa.Column("message_row_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("ref", sa.String(998), nullable=False),
        sa.ForeignKeyConstraint(
            ["message_row_id"], ["messages.id"],
            name=op.f("fk_message_refs_message_row_id_messages"), ondelete="CASCADE",
        ),
    )
    op.create_index("ix_message_refs_user_ref", "message_refs", ["user_id", "ref"])
    op.create_index("ix_message_refs_message_row_id", "message_refs", ["message_row_id"])

    op.create_table(
        "message_attachments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("message_row_id", sa.Integer(), nullable=False),
        sa.Column("part_path", sa.String(255), nullable=False),
        sa.Column("filename", sa.Text(), nullable=False, server_default=""),
        sa.Column("mime_type", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("content_id", sa.String(998), nullable=True),
        sa.ForeignKeyConstraint(
            ["message_row_id"], ["messages.id"],
            name=op.f("fk_message_attachments_message_row_id_messages"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_message_attachments")),
    )
    op.create_index(
        "ix_message_attachments_message_row_id", "message_attachments", ["message_row_id"]
    )

    # The full-text index, one per dialect; kept in step by mailcore.messages.search.
    if op.get_bind().dialect.name == "sqlite":
        op.execute(
            "CREATE VIRTUAL TABLE messages_fts USING fts5("
            "subject, sender, recipient, body, tokenize='unicode61 remove_diacritics 2')"
        )
        op.execute(
            "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN "
            "DELETE FROM messages_fts WHERE rowid = old.id; END"
        )
    else:
        op.execute(
            "CREATE TABLE message_search ("
            "message_row_id INTEGER PRIMARY KEY REFERENCES messages(id) ON DELETE CASCADE, "
            "document tsvector NOT NULL)"
        )
        op.execute(
            "CREATE INDEX ix_message_search_document ON message_search USING GIN (document)"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS messages_fts_delete")
        op.execute("DROP TABLE IF EXISTS messages_fts")
    else:
        op.execute("DROP TABLE IF EXISTS message_search")
    op.drop_table("message_attachments")
    op.drop_table("message_refs")
    op.drop_table("messages")
    op.drop_table("threads")
    op.drop_table("message_blobs")
    op.drop_table("fetch_folders")
    op.drop_table("fetch_accounts")
