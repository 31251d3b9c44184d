"""Dropmyemail attachments indexed once (issue 12): reserved, filled by its change.

Revision ID: 0017_backup_attachments
Revises: 0016_job_leases
"""

revision = "0017_backup_attachments"
down_revision = "0016_job_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
