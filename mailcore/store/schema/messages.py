"""The message store: raw blobs by hash, parsed messages, attachments, threads (migration 0004).

The full-text index is not declared here: it is a dialect-specific object made by the
migrations (SQLite: FTS5 virtual table `messages_fts` over the columns of `messages`, its
shadow tables and the triggers that keep it in step; PostgreSQL:
`message_search` with a tsvector column and a GIN index). `FTS_TABLES` names them so a schema
comparison can leave them out.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from mailcore.store.schema.meta import metadata
from mailcore.store.schema.types import UTCDateTime

FTS_TABLES = (
    "messages_fts",
    "messages_fts_data",
    "messages_fts_idx",
    "messages_fts_content",
    "messages_fts_docsize",
    "messages_fts_config",
    "message_search",
)

# The exact bytes of a message, stored once per SHA-256 (hex) whatever the number of copies.
message_blobs = Table(
    "message_blobs",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("size", BigInteger, nullable=False),
    Column("raw", LargeBinary, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# A conversation of one user; messages point at it. `subject_key` is the normalised subject
# (no Re:/Fwd: prefixes, lower case) used by the subject fallback of threading.
threads = Table(
    "threads",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("subject_key", Text, nullable=False, server_default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # How many messages point at the thread; kept by triggers (migration 0020).
    Column("message_count", BigInteger, nullable=False, server_default="0"),
    Index("ix_threads_user_subject", "user_id", "subject_key"),
    sqlite_autoincrement=True,  # an id is never given twice (migration 0069)
)

# One copy of a message in one folder: IMAP (folder, uidvalidity, uid) or POP3 (folder, uidl).
# Parsed fields are those of the blob; copies of one blob share them.
messages = Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column(
        "account_id", Integer, ForeignKey("fetch_accounts.id", ondelete="CASCADE"),
        nullable=True,
    ),
    Column(
        "folder_id", Integer, ForeignKey("fetch_folders.id", ondelete="CASCADE"),
        nullable=True,
    ),
    Column("folder", String(1024), nullable=False, server_default="INBOX"),
    Column("uidvalidity", BigInteger, nullable=True),
    Column("uid", BigInteger, nullable=True),
    Column("pop_uidl", String(255), nullable=True),
    Column("sha256", String(64), ForeignKey("message_blobs.sha256"), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("flags", Text, nullable=False, server_default=""),
    Column("internal_date", UTCDateTime(), nullable=True),
    Column("on_server", Boolean, nullable=False, server_default="1"),
    Column("message_id", String(998), nullable=False, server_default=""),
    Column("subject", Text, nullable=False, server_default=""),
    Column("sender", Text, nullable=False, server_default=""),
    Column("sender_address", String(320), nullable=False, server_default=""),
    Column("recipient", Text, nullable=False, server_default=""),
    Column("date", UTCDateTime(), nullable=True),
    # Written with the row, never changed: a list filtered by it is kept with the user's
    # change stamp (`messages.store._stamped`); a change of it would have to move the stamp.
    Column("has_attachments", Boolean, nullable=False, server_default="0"),
    Column("thread_id", Integer, ForeignKey("threads.id", ondelete="SET NULL"), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    # The telephone number of the text's signature block ("" if none); NULL until the
    # backup indexer has read it (mailcore.backup.index, migration 0017).
    Column("signature_phone", String(64), nullable=True),
    # The long text last, in the stored order of SQLite's rows (migration 0025): a value
    # longer than its page continues on a chain of overflow pages, which a read of any
    # column after it walks. What lists, counts and lookups read comes before.
    Column("cc", Text, nullable=False, server_default=""),
    Column("in_reply_to", String(998), nullable=False, server_default=""),
    Column("references", Text, nullable=False, server_default=""),
    Column("parse_problems", Text, nullable=False, server_default=""),
    Column("headers", Text, nullable=False, server_default=""),
    Column("body_text", Text, nullable=False, server_default=""),
    Column("body_html", Text, nullable=False, server_default=""),
    # Indexed text beyond body_text: the HTML body's text and the attachments' file names
    # ("" for a plain-text message). The SQLite full-text index reads its text from these
    # columns of the row (external content, migration 0023) instead of keeping a copy.
    Column("search_extra", Text, nullable=False, server_default=""),
    UniqueConstraint("folder_id", "uidvalidity", "uid", name="uq_messages_folder_uid"),
    UniqueConstraint("folder_id", "pop_uidl", name="uq_messages_folder_uidl"),
    Index("ix_messages_user_date", "user_id", "date"),
    # A list of one account, or of one of its folders, in date order, whatever the user's
    # other mail (migration 0028; `messages.store._shape_terms`).
    Index("ix_messages_account_folder_date", "account_id", "folder", "date"),
    Index("ix_messages_account_date", "account_id", "date"),
    # What a sync cut short had stored, counted as it is settled (migration 0065).
    Index("ix_messages_account_created", "account_id", "created_at"),
    Index("ix_messages_thread_date", "thread_id", "date"),
    Index("ix_messages_user_folder_date", "user_id", "folder", "date"),
    Index("ix_messages_user_message_id", "user_id", "message_id"),
    Index("ix_messages_sha256", "sha256"),
    Index("ix_messages_signature_unscanned", "id",
          sqlite_where=text("signature_phone IS NULL"),
          postgresql_where=text("signature_phone IS NULL")),
    sqlite_autoincrement=True,  # an id is never given twice (migration 0069)
)

# The size POP3's LIST gave a message fetched by POP3 under its UIDL (migration 0061): a
# server may give a new message the UIDL of one deleted, and a size changed under a UIDL
# we hold tells another message (`mailcore.fetch.engine`). Beside `messages`, not in it: a
# column added there goes after its long text, which reading it would walk (migration 0025).
message_pop_sizes = Table(
    "message_pop_sizes",
    metadata,
    Column(
        "message_row_id", Integer, ForeignKey("messages.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("size", BigInteger, nullable=False),
)

# Message-IDs a message points at (References and In-Reply-To), to find the children of a
# message that arrives after them.
message_refs = Table(
    "message_refs",
    metadata,
    Column(
        "message_row_id", Integer, ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("user_id", Integer, nullable=False),
    Column("ref", String(998), nullable=False),
    Index("ix_message_refs_user_ref", "user_id", "ref"),
    Index("ix_message_refs_message_row_id", "message_row_id"),
)

# Attachments of a message: what they are, and where in the MIME tree (`part_path`, e.g.
# "2.1") so the content can be cut out of the raw blob on demand.
message_attachments = Table(
    "message_attachments",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "message_row_id", Integer, ForeignKey("messages.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("part_path", String(255), nullable=False),
    Column("filename", Text, nullable=False, server_default=""),
    Column("mime_type", String(255), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("content_id", String(998), nullable=True),
    # What libmagic says of the decoded bytes (file(1)); NULL until the backup indexer has
    # described it (mailcore.backup.index, migration 0017).
    Column("meta_data", Text, nullable=True),
    Index("ix_message_attachments_message_row_id", "message_row_id"),
    Index("ix_message_attachments_undescribed", "id",
          sqlite_where=text("meta_data IS NULL"), postgresql_where=text("meta_data IS NULL")),
    sqlite_autoincrement=True,  # an id is never given twice (migration 0069)
)

# Messages per (user, account, folder), kept by triggers on `messages` (migration 0020):
# `account_key` is the account id (0: outside any account); `changes` rises with every
# insert, delete or move of one of the user's messages and never falls.
message_counts = Table(
    "message_counts",
    metadata,
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("account_key", Integer, primary_key=True),
    Column("folder", String(1024), primary_key=True),
    Column("total", BigInteger, nullable=False),
    Column("changes", BigInteger, nullable=False),
)

# Per user, the threads that hold at least one message; kept by triggers on `threads`.
message_thread_totals = Table(
    "message_thread_totals",
    metadata,
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("threads", BigInteger, nullable=False),
)
