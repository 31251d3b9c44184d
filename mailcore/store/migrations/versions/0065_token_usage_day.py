"""An index for the token sweep's purge of old per-day usage (TokenService.purge).

The purge deletes the usage rows of days past `[tokens] usage_retention_days` (`day < ...`),
a batch a transaction: the table's key is (user_id, day), so without this index each batch
read the whole of `token_usage`, which holds a row per user and day of the last 400 days.

Upgrade: `ix_token_usage_day`. Downgrade: it goes.

Revision ID: 0065_token_usage_day
Revises: 0064_webhook_prune_index
"""

from __future__ import annotations

from alembic import op

revision = "0065_token_usage_day"
down_revision = "0064_webhook_prune_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_token_usage_day", "token_usage", ["day"])


def downgrade() -> None:
    op.drop_index("ix_token_usage_day", table_name="token_usage")
