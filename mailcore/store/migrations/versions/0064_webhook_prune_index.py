"""An index for the hourly prune of the webhook delivery log (WebhookPruner).

The prune deletes finished deliveries that completed before a moment (`completed_at < ...`,
not pending), a batch a transaction: without this index each batch read the whole of
`webhook_deliveries`, which holds every delivery of the last `[webhooks] retention_days`.

Upgrade: `ix_webhook_deliveries_completed_at`. Downgrade: it goes.

Revision ID: 0064_webhook_prune_index
Revises: 0063_job_webhook_ids
"""

from __future__ import annotations

from alembic import op

revision = "0064_webhook_prune_index"
down_revision = "0063_job_webhook_ids"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_webhook_deliveries_completed_at", "webhook_deliveries",
                    ["completed_at"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_completed_at", table_name="webhook_deliveries")
