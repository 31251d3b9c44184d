"""Migrate and restore jobs (issue 13): reserved, filled by its change.

Revision ID: 0018_mailbox_jobs
Revises: 0017_backup_attachments
"""

revision = "0018_mailbox_jobs"
down_revision = "0017_backup_attachments"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
