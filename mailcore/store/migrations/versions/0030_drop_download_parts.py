"""safedrop: a file counts as downloaded once the parts a recipient was sent cover it.

A file counted as downloaded (receipts, read_remove) only when one response carried all of
it; a download resumed with Range, or fetched in pieces, never counted, so a read_remove
drop stayed until it expired and its "every file" receipt never went. `drop_download_parts`
keeps, per recipient and file, the merged runs of bytes sent in responses that were not the
whole file; when they cover it, the file counts and its runs are deleted.

Upgrade: the table, empty (downloads before it counted as they did). Downgrade: the table
goes (parts not yet covering a file are forgotten).

Revision ID: 0030_drop_download_parts
Revises: 0029_mailapi_outbox_order
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0030_drop_download_parts"
down_revision = "0029_mailapi_outbox_order"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drop_download_parts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("recipient_id", sa.Integer(), nullable=False),
        sa.Column("file_id", sa.Integer(), nullable=False),
        sa.Column("first_byte", sa.BigInteger(), nullable=False),
        sa.Column("last_byte", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["recipient_id"], ["drop_recipients.id"],
            name=op.f("fk_drop_download_parts_recipient_id_drop_recipients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["file_id"], ["drop_files.id"],
            name=op.f("fk_drop_download_parts_file_id_drop_files"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drop_download_parts")),
    )
    op.create_index("ix_drop_download_parts_recipient", "drop_download_parts",
                    ["recipient_id", "file_id"])


def downgrade() -> None:
    op.drop_index("ix_drop_download_parts_recipient", table_name="drop_download_parts")
    op.drop_table("drop_download_parts")
