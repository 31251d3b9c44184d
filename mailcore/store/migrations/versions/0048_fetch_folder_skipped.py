"""fetch_folders.skipped_uids: the UIDs a folder's last sync could not fetch.

A message skipped by an IMAP sync (over `[fetch] max_message_bytes`, or whose body the server
left out twice) was never tried again: the next sync looks only above the highest UID held.
Its error on the folder went at the next sync, or at once when the folder had not changed,
so the backup lacked it without a word. The UIDs are now kept (space-separated, under the
folder's saved UIDVALIDITY), tried again at each sync, and the folder keeps its error as
long as one is still skipped.

Upgrade: the column (NULL: none skipped). Downgrade: it goes.

Revision ID: 0048_fetch_folder_skipped
Revises: 0046_quarantine_digest_runs
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0048_fetch_folder_skipped"
down_revision = "0046_quarantine_digest_runs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fetch_folders") as batch:
        batch.add_column(sa.Column("skipped_uids", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fetch_folders") as batch:
        batch.drop_column("skipped_uids")
