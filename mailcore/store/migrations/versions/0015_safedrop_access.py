"""safedrop, the recipient's side: first opening, one-time codes, downloads.

Revision ID: 0015_safedrop_access
Revises: 0014_oauth
"""

import sqlalchemy as sa
from alembic import op

revision = "0015_safedrop_access"
down_revision = "0014_oauth"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("drop_recipients") as batch:
        batch.add_column(sa.Column("opened_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("code_digest", sa.LargeBinary(32), nullable=True))
        batch.add_column(
            sa.Column("code_expires_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch.add_column(
            sa.Column("code_attempts", sa.Integer(), nullable=False, server_default="0")
        )
    op.create_table(
        "drop_downloads",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("recipient_id", sa.Integer(), nullable=False),
        sa.Column("file_id", sa.Integer(), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["recipient_id"], ["drop_recipients.id"],
            name=op.f("fk_drop_downloads_recipient_id_drop_recipients"), ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["file_id"], ["drop_files.id"],
            name=op.f("fk_drop_downloads_file_id_drop_files"), ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drop_downloads")),
        sa.UniqueConstraint("recipient_id", "file_id",
                            name=op.f("uq_drop_downloads_recipient_id")),
    )


def downgrade() -> None:
    op.drop_table("drop_downloads")
    with op.batch_alter_table("drop_recipients") as batch:
        batch.drop_column("code_attempts")
        batch.drop_column("code_expires_at")
        batch.drop_column("code_digest")
        batch.drop_column("opened_at")
