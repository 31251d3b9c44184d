"""users: `deleting_at`, set when `mailcore user delete` begins to delete the user.

A user is deleted in steps, each through the service that owns what it removes (domains,
mailboxes and their mail, safedrop files on disk, fetch accounts, webhooks, OAuth apps,
credentials), and the user row goes last. The first step disables the user and sets this
time, in one commit: a deletion cut short (a crash, kill -9) leaves a disabled user marked
so, which `user enable` refuses and `user delete` finishes.

Upgrade: the nullable column. Downgrade: it goes (a user marked stays disabled).

Revision ID: 0042_user_deleting
Revises: 0041_quarantine_email_key
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0042_user_deleting"
down_revision = "0041_quarantine_email_key"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("deleting_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Not in batch mode: SQLite (3.35 and later, as the store requires) drops a column in
    # place, where a rebuild of the table would lose its indexes on lower() (0040).
    op.drop_column("users", "deleting_at")
