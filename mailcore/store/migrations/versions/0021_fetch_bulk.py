"""Bulk backup writes (issue 17.1): no schema change was needed; this revision stays, empty,
because stores have been stamped with it.

Revision ID: 0021_fetch_bulk
Revises: 0020_message_read_indexes
"""

revision = "0021_fetch_bulk"
down_revision = "0020_message_read_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
