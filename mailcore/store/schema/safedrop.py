"""safedrop (seed 003): drop bundles, their recipients and files (migration 0012).

Secrets never appear in clear: `password_hash` is an Argon2id hash, `secure_message` Fernet
ciphertext, and a recipient's link is kept as the SHA-256 of its token. A bundle is sent
once (`sent_at`, set by a conditional UPDATE); `removed_at` is set when its files have been
deleted from disk (every recipient has read it with read_remove, it expired, or no link
opens it any more), and its secrets are cleared then (`has_secure_message` still says
whether it had a secure message: migration 0051). File bytes
live on disk under the data directory (`safedrop/<bundle id>/<sha256>`), never in a row.
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

drop_bundles = Table(
    "drop_bundles",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("owner_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("subject", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("secure_message", LargeBinary, nullable=True),
    Column("has_secure_message", Boolean, nullable=False, server_default="0"),
    Column("password_hash", String(255), nullable=True),
    Column("expiry_date", DateTime(timezone=True), nullable=True),
    Column("email_receipt_when", Integer, nullable=False),
    Column("read_remove", Boolean, nullable=False),
    Column("allow_comments", Boolean, nullable=False),
    Column("require_token_auth", Boolean, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("sent_at", DateTime(timezone=True), nullable=True),
    Column("removed_at", DateTime(timezone=True), nullable=True),
    Index("ix_drop_bundles_owner", "owner_id", "id"),
    Index("ix_drop_bundles_expiry", "expiry_date"),
    # The owner's bundles not yet sent, which `[safedrop] max_bundles_per_user` counts at
    # each create (`create_bundle_txn`), whatever the owner sent before (migration 0067).
    Index("ix_drop_bundles_owner_unsent", "owner_id",
          sqlite_where=text("sent_at IS NULL"), postgresql_where=text("sent_at IS NULL")),
    sqlite_autoincrement=True,  # an id is never given twice (migration 0069)
)

drop_recipients = Table(
    "drop_recipients",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "bundle_id", Integer, ForeignKey("drop_bundles.id", ondelete="CASCADE"), nullable=False
    ),
    Column("email", String(320), nullable=False),
    Column("telephone", String(16), nullable=False),
    Column("valid_for", BigInteger, nullable=False),
    # Set when the bundle is sent: SHA-256 of the link token, and when access ends.
    Column("link_digest", LargeBinary(32), nullable=True, unique=True),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    # When this recipient had downloaded every file (read_remove ends its access then).
    Column("done_at", DateTime(timezone=True), nullable=True),
    # The recipient's side (migration 0015): first opened; the one-time code of token
    # auth (SHA-256 of recipient id and code), its expiry and the wrong guesses so far.
    Column("opened_at", DateTime(timezone=True), nullable=True),
    Column("code_digest", LargeBinary(32), nullable=True),
    Column("code_expires_at", DateTime(timezone=True), nullable=True),
    Column("code_attempts", Integer, nullable=False, server_default="0"),
    # Wrong codes entered in all, which a new code does not reset, and until when too many
    # of them lock the link (migration 0032).
    Column("code_failures", Integer, nullable=False, server_default="0"),
    Column("code_locked_until", DateTime(timezone=True), nullable=True),
    # The same for wrong drop passwords (migration 0035).
    Column("password_failures", Integer, nullable=False, server_default="0"),
    Column("password_locked_until", DateTime(timezone=True), nullable=True),
    # When the sender was last told this recipient opened the drop (email_receipt_when=1:
    # at most one such receipt an hour; migration 0033).
    Column("opened_receipt_at", DateTime(timezone=True), nullable=True),
    Index("ix_drop_recipients_bundle", "bundle_id", "id"),
    sqlite_autoincrement=True,  # an id is never given twice (migration 0069)
)

drop_files = Table(
    "drop_files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "bundle_id", Integer, ForeignKey("drop_bundles.id", ondelete="CASCADE"), nullable=False
    ),
    Column("name", Text, nullable=False),
    Column("content_type", String(255), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_drop_files_bundle", "bundle_id", "id"),
    sqlite_autoincrement=True,  # an id is never given twice (migration 0069)
)

# Which files each recipient has downloaded in full (for read_remove and receipts).
drop_downloads = Table(
    "drop_downloads",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "recipient_id", Integer, ForeignKey("drop_recipients.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("file_id", Integer, ForeignKey("drop_files.id", ondelete="CASCADE"), nullable=False),
    Column("completed_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("recipient_id", "file_id"),
)

# The bytes of a file a recipient was sent in responses that did not carry all of it (a
# Range, a resumed or an interrupted download): merged runs of byte offsets, both ends
# included. Once they cover the file it counts as downloaded (drop_downloads) and its runs
# go (migration 0030).
drop_download_parts = Table(
    "drop_download_parts",
    metadata,
    Column("id", Integer, primary_key=True),
    Column(
        "recipient_id", Integer, ForeignKey("drop_recipients.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("file_id", Integer, ForeignKey("drop_files.id", ondelete="CASCADE"), nullable=False),
    Column("first_byte", BigInteger, nullable=False),
    Column("last_byte", BigInteger, nullable=False),
    Index("ix_drop_download_parts_recipient", "recipient_id", "file_id"),
)

# The downloads of a read_remove file a recipient has started (migration 0036): once
# `[safedrop] max_download_attempts` have, the file counts as downloaded when the last one
# ends, whatever bytes they sent, and no further download of it starts.
drop_download_attempts = Table(
    "drop_download_attempts",
    metadata,
    Column(
        "recipient_id", Integer, ForeignKey("drop_recipients.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("file_id", Integer, ForeignKey("drop_files.id", ondelete="CASCADE"),
           primary_key=True),
    Column("attempts", Integer, nullable=False),
)
