"""Fetch accounts (remote IMAP/POP3 mailboxes) and their per-folder sync state (migration 0004)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from mailcore.store.schema.meta import metadata

# A remote mailbox a user backs up. `password_enc` is the Fernet token of the remote password
# (never returned). `tls_mode` is derived from ssl/start_tls; `tls_ca_pem` / `tls_fingerprint`
# let a private server be verified without turning verification off. An id is never given
# twice (SQLite AUTOINCREMENT, migration 0062): clients, webhook receivers and the untold
# webhook events of a deleted account name an account by id.
fetch_accounts = Table(
    "fetch_accounts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(255), nullable=False, server_default=""),
    Column("email", String(254), nullable=False, server_default=""),
    Column("protocol", String(8), nullable=False, server_default="imap"),
    Column("host", String(255), nullable=False),
    Column("port", Integer, nullable=False),
    Column("username", String(255), nullable=False),
    Column("password_enc", LargeBinary, nullable=False),
    Column("use_ssl", Boolean, nullable=False, server_default="0"),
    Column("start_tls", Boolean, nullable=False, server_default="0"),
    Column("allow_cleartext", Boolean, nullable=False, server_default="0"),
    Column("tls_ca_pem", Text, nullable=True),
    Column("tls_fingerprint", String(64), nullable=True),
    Column("sync_limit_type", String(8), nullable=False, server_default="all"),
    Column("sync_limit_value", Integer, nullable=False, server_default="0"),
    Column("folders_to_sync", Text, nullable=False, server_default=""),
    Column("exclude_trash", Boolean, nullable=False, server_default="1"),
    Column("sync_interval", Integer, nullable=True),
    Column("enabled", Boolean, nullable=False, server_default="1"),
    Column("last_sync", DateTime(timezone=True), nullable=True),
    Column("sync_status", String(16), nullable=False, server_default="never"),
    Column("sync_error", Text, nullable=True),
    Column("sync_started_at", DateTime(timezone=True), nullable=True),
    Column("progress_folder", String(1024), nullable=True),
    Column("progress_done", Integer, nullable=False, server_default="0"),
    Column("progress_total", Integer, nullable=False, server_default="0"),
    # The node syncing the account now and until when (epoch seconds; renewed while the
    # sync runs): no two nodes sync one account at once (migration 0016).
    Column("lease_owner", String(128), nullable=True),
    Column("lease_until", Float, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    Index("ix_fetch_accounts_user_id", "user_id"),
    sqlite_autoincrement=True,
)

# One remote folder of an account and what we know of it. (uidvalidity, uidnext,
# highestmodseq) are saved only after a folder sync completed; the authority on what we hold
# is the messages table. A POP3 account has one folder, INBOX, with uidvalidity 0.
fetch_folders = Table(
    "fetch_folders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "account_id", Integer, ForeignKey("fetch_accounts.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("name", String(1024), nullable=False),
    Column("delimiter", String(4), nullable=True),
    Column("special_use", String(32), nullable=True),
    Column("uidvalidity", BigInteger, nullable=True),
    Column("uidnext", BigInteger, nullable=True),
    Column("highestmodseq", BigInteger, nullable=True),
    Column("exists_on_server", Boolean, nullable=False, server_default="1"),
    Column("last_sync", DateTime(timezone=True), nullable=True),
    Column("sync_error", Text, nullable=True),
    # The UIDs (under `uidvalidity`, space-separated) the last sync could not fetch: over
    # the size limit, or their body left out twice. Tried again at each sync; the folder
    # keeps its error while one is left (mailcore.fetch.engine).
    Column("skipped_uids", Text, nullable=True),
    UniqueConstraint("account_id", "name", name="uq_fetch_folders_account_name"),
    sqlite_autoincrement=True,  # an id is never given twice (migration 0069)
)
