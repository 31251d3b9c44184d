"""Indexes for the purge of expired credentials and idle login tokens (CredentialSweeper).

The purge (Identity.purge_expired) deletes, a batch a transaction, the credentials that
expired before a moment (`expires_at < ...`: safedrop and page sessions, mostly) and, with
`login_token_idle` set, the login tokens last used (or made, never used) before one
(`login AND coalesce(last_used_at, created_at) < ...`): without these indexes each batch
read the whole of `credentials`, which holds every session live or expired within the
last day.

Upgrade: `ix_credentials_expires_at`, `ix_credentials_login_idle` (on login and the
expression). Downgrade: they go.

Revision ID: 0066_credential_purge_indexes
Revises: 0065_purge_and_count_indexes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0066_credential_purge_indexes"
down_revision = "0065_purge_and_count_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_credentials_expires_at", "credentials", ["expires_at"])
    op.create_index("ix_credentials_login_idle", "credentials",
                    ["login", sa.text("coalesce(last_used_at, created_at)")])


def downgrade() -> None:
    op.drop_index("ix_credentials_login_idle", table_name="credentials")
    op.drop_index("ix_credentials_expires_at", table_name="credentials")
