"""An index of the safedrop bundles not yet sent, by owner, for `[safedrop]
max_bundles_per_user`.

A create counts its owner's bundles not yet sent (`mailcore.safedrop.store.
create_bundle_txn`). Through `ix_drop_bundles_owner` (owner_id, id) alone that count read an
index entry and a row of every bundle the owner ever had, sent ones included: a user with a
million sent drops made each create read a million rows. The partial index holds the unsent
bundles only (on SQLite and on PostgreSQL), which the cap bounds.

Upgrade: `ix_drop_bundles_owner_unsent` (owner_id WHERE sent_at IS NULL). Downgrade: it
goes.

Revision ID: 0067_drop_unsent_index
Revises: 0066_credential_purge_indexes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0067_drop_unsent_index"
down_revision = "0066_credential_purge_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_drop_bundles_owner_unsent", "drop_bundles", ["owner_id"],
                    sqlite_where=sa.text("sent_at IS NULL"),
                    postgresql_where=sa.text("sent_at IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_drop_bundles_owner_unsent", table_name="drop_bundles")
