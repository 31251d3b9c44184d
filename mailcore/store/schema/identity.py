"""Identity tables: users and their credentials (migrations 0001, 0009, 0039, 0040, 0042,
0066)."""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    func,
)

from mailcore.store.schema.meta import metadata

# -- identity (0001) ----------------------------------------------------------------------

users = Table(
    "users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("username", String(150), nullable=False, unique=True),
    Column("email", String(254), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=True),
    Column("nic", String(64), nullable=False),
    Column("first_name", String(150), nullable=False, server_default=""),
    Column("last_name", String(150), nullable=False, server_default=""),
    Column("organisation", String(255), nullable=False, server_default=""),
    Column("tva_intra", String(64), nullable=False, server_default=""),
    Column("address", String(255), nullable=False, server_default=""),
    Column("city", String(150), nullable=False, server_default=""),
    Column("zip", String(32), nullable=False, server_default=""),
    Column("country", String(64), nullable=False, server_default=""),
    Column("phone", String(64), nullable=False, server_default=""),
    Column("plan", String(16), nullable=False, server_default="free"),
    Column("is_active", Boolean, nullable=False, server_default="1"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # (0042) When `mailcore user delete` began to delete the user (it is disabled since):
    # set until the row goes, the last step; `user enable` refuses such a user.
    Column("deleting_at", DateTime(timezone=True), nullable=True),
    sqlite_autoincrement=True,  # an id is never given twice (migration 0069)
)
# Compared in lower case (identity.name_key): unique so, not only as typed (0040).
Index("ux_users_username_lower", func.lower(users.c.username), unique=True)
Index("ux_users_email_lower", func.lower(users.c.email), unique=True)

# One table for every credential kind: "apikey" (Protecmail Api-Key, safedrop X-Auth-Key),
# "token" (IMAP2API Token, Mail API auth_key; no expiry) and "session" (safedrop
# X-Auth-Token; expires). The secret itself is never stored: `digest` is SHA-256 of it and
# `prefix` (its first characters) finds the candidate rows. `parent_id` (0009) links a
# credential made from another one (a safedrop session from its API key) to that parent:
# it resolves only while the parent does, and goes when the parent row is deleted.
credentials = Table(
    "credentials",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("prefix", String(16), nullable=False),
    Column("digest", LargeBinary(32), nullable=False),
    Column("label", String(255), nullable=False, server_default=""),
    Column("scopes", String(255), nullable=False, server_default="*"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=True),
    Column("last_used_at", DateTime(timezone=True), nullable=True),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Column(
        "parent_id", Integer, ForeignKey("credentials.id", ondelete="CASCADE"), nullable=True
    ),
    # (0039) Made by a password login (/api-token-auth/, /api/v1/auth/), not by the CLI:
    # such a credential ends when the password changes, and a user keeps a bounded number.
    Column("login", Boolean, nullable=False, server_default="0"),
    Index("ix_credentials_prefix", "prefix"),
    Index("ix_credentials_user_kind", "user_id", "kind"),
    Index("ix_credentials_parent_id", "parent_id"),
    # (0066) For the purge (Identity.purge_expired): the expired ones, and the login tokens
    # by their last use (or their making, never used).
    Index("ix_credentials_expires_at", "expires_at"),
)
Index("ix_credentials_login_idle", credentials.c.login,
      func.coalesce(credentials.c.last_used_at, credentials.c.created_at))

