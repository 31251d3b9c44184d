"""Indexes for the hourly prune of OAuth rows (mailcore.oauth.provider.OAuthPruner).

The prune deletes token rows rotated or revoked before a moment (`revoked_at <= ...`) and
codes expired before another (`expires_at <= ...`, that no token names): without these
indexes each of its batches read the whole of `oauth_tokens` and `oauth_codes`, which grow
with every refresh and every Allow.

Upgrade: `ix_oauth_tokens_revoked_at` and `ix_oauth_codes_expires_at`. Downgrade: they go.

Revision ID: 0060_oauth_prune_indexes
Revises: 0059_webhook_events
"""

from __future__ import annotations

from alembic import op

revision = "0060_oauth_prune_indexes"
down_revision = "0059_webhook_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_oauth_tokens_revoked_at", "oauth_tokens", ["revoked_at"])
    op.create_index("ix_oauth_codes_expires_at", "oauth_codes", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_oauth_codes_expires_at", table_name="oauth_codes")
    op.drop_index("ix_oauth_tokens_revoked_at", table_name="oauth_tokens")
