"""Mail API attachment files on disk (issue 14): reserved, filled by its change.

Revision ID: 0019_mailapi_files
Revises: 0018_mailbox_jobs
"""

revision = "0019_mailapi_files"
down_revision = "0018_mailbox_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
