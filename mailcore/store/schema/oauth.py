"""The OAuth 2 provider's tables (Dropmyemail, seed 000; migration 0014).

`oauth_apps` are the registered third-party clients: `uid` is the public client_id, the
secret is kept only as its SHA-256 (`secret_digest`), and `redirect_uris` holds the exact
URIs registered, one per line. `oauth_codes` are authorization codes (digest only; single
use: `used_at` is set by the exchange) with their PKCE challenge. `oauth_tokens` holds one
access token and its refresh token per row (digests only); a refresh makes a new row and
revokes the old one, and every row issued from a code keeps `code_id`, so that a reused
code revokes everything that came from it.
"""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
)

from mailcore.store.schema.meta import metadata

oauth_apps = Table(
    "oauth_apps",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("uid", String(64), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("owner_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("secret_digest", LargeBinary(32), nullable=False),
    Column("redirect_uris", Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_oauth_apps_owner_id", "owner_id"),
)

oauth_codes = Table(
    "oauth_codes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("app_id", Integer, ForeignKey("oauth_apps.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("digest", LargeBinary(32), nullable=False, unique=True),
    # The redirect_uri the authorization request named (NULL: it named none).
    Column("redirect_uri", Text, nullable=True),
    Column("scopes", String(255), nullable=False),
    Column("code_challenge", String(128), nullable=True),
    Column("code_challenge_method", String(16), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True), nullable=True),
    Index("ix_oauth_codes_app_user", "app_id", "user_id"),
    Index("ix_oauth_codes_expires_at", "expires_at"),  # the prune (migration 0060)
)

oauth_tokens = Table(
    "oauth_tokens",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("app_id", Integer, ForeignKey("oauth_apps.id", ondelete="CASCADE"), nullable=False),
    Column("user_id", Integer, ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column(
        "code_id", Integer, ForeignKey("oauth_codes.id", ondelete="SET NULL"), nullable=True
    ),
    Column("access_digest", LargeBinary(32), nullable=False, unique=True),
    Column("refresh_digest", LargeBinary(32), nullable=True, unique=True),
    Column("scopes", String(255), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True), nullable=True),
    Index("ix_oauth_tokens_app_user", "app_id", "user_id"),
    Index("ix_oauth_tokens_code_id", "code_id"),
    Index("ix_oauth_tokens_revoked_at", "revoked_at"),  # the prune (migration 0060)
)
