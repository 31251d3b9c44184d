"""Indexes for the token sweep's purge and for settling an interrupted sync.

The token sweep (TokenService.purge) deletes the usage rows of days past `[tokens]
usage_retention_days` (`day < ...`), a batch a transaction: the table's key is (user_id,
day), so without `ix_token_usage_day` each batch read the whole of `token_usage`, which
holds a row per user and day of the last 400 days.

A sync killed mid-way is settled by a write transaction that counts the messages it had
stored (`messages` of the account with `created_at >= ` its start: fetch.state.
thd_created_since): without `ix_messages_account_created` the count read every message of
the account (ix_messages_account_date, then each row), holding SQLite's write lock for
as long (0.7 s for 300,000 messages in memory); with it the count reads the index alone.

Upgrade: `ix_token_usage_day`, `ix_messages_account_created`. Downgrade: they go.

A store migrated by 09a378d was stamped `0065_token_usage_day`, this revision's first id,
when it made `ix_token_usage_day` alone: it is restamped 0064 (RETIRED_REVISIONS in
mailcore/store/migrate.py) and comes here with that index, so the upgrade makes it only
where it is missing.

Revision ID: 0065_purge_and_count_indexes
Revises: 0064_webhook_prune_index
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0065_purge_and_count_indexes"
down_revision = "0064_webhook_prune_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    indexes = {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("token_usage")}
    if "ix_token_usage_day" not in indexes:  # (a store of 0065_token_usage_day has it)
        op.create_index("ix_token_usage_day", "token_usage", ["day"])
    op.create_index("ix_messages_account_created", "messages", ["account_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_messages_account_created", table_name="messages")
    op.drop_index("ix_token_usage_day", table_name="token_usage")
