"""safedrop: the downloads of a read_remove file a recipient started are counted.

A read_remove file counted as downloaded only once every byte of it had been sent, so a
recipient could fetch all of it but the last byte (a Range, or a connection dropped just
before the end) any number of times, and fetch a file it had whole again while another file
of the drop was left undownloaded: the self-destruct never came. `drop_download_attempts`
counts, per recipient and read_remove file, the downloads that started; past `[safedrop]
max_download_attempts` the file counts as downloaded.

Upgrade: the table, empty (downloads started before count from none). Downgrade: it goes.

Revision ID: 0036_drop_download_attempts
Revises: 0035_drop_password_failures
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0036_drop_download_attempts"
down_revision = "0035_drop_password_failures"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "drop_download_attempts",
        sa.Column("recipient_id", sa.Integer(), nullable=False),
        sa.Column("file_id", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["recipient_id"], ["drop_recipients.id"],
            name=op.f("fk_drop_download_attempts_recipient_id_drop_recipients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["file_id"], ["drop_files.id"],
            name=op.f("fk_drop_download_attempts_file_id_drop_files"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("recipient_id", "file_id",
                                name=op.f("pk_drop_download_attempts")),
    )


def downgrade() -> None:
    op.drop_table("drop_download_attempts")
