"""Indexes and counts for the message APIs at scale (issue 17.4): reserved, filled by its change.

Revision ID: 0020_message_read_indexes
Revises: 0019_mailapi_files
"""

revision = "0020_message_read_indexes"
down_revision = "0019_mailapi_files"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
