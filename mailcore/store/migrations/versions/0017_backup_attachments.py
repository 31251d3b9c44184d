"""Dropmyemail's index of the backup, filled once per item (issue 12).

`message_attachments.meta_data`: what libmagic (`file(1)`) says of the attachment's decoded
bytes. `messages.signature_phone`: the telephone number found in the signature block of the
message's text ("" when there is none). Both are NULL until the background indexer
(`mailcore.backup.index`) has described the row; existing backups are described by its first
passes after the upgrade (this migration only adds the columns, it reads no mail). The
partial indexes hold only the rows still to describe, so that finding them stays cheap
however large the store grows.

Revision ID: 0017_backup_attachments
Revises: 0016_job_leases
"""

import sqlalchemy as sa
from alembic import op

revision = "0017_backup_attachments"
down_revision = "0016_job_leases"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("message_attachments") as batch:
        batch.add_column(sa.Column("meta_data", sa.Text(), nullable=True))
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("signature_phone", sa.String(64), nullable=True))
    op.create_index(
        "ix_message_attachments_undescribed", "message_attachments", ["id"],
        sqlite_where=sa.text("meta_data IS NULL"),
        postgresql_where=sa.text("meta_data IS NULL"),
    )
    op.create_index(
        "ix_messages_signature_unscanned", "messages", ["id"],
        sqlite_where=sa.text("signature_phone IS NULL"),
        postgresql_where=sa.text("signature_phone IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_signature_unscanned", table_name="messages")
    op.drop_index("ix_message_attachments_undescribed", table_name="message_attachments")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("signature_phone")
    with op.batch_alter_table("message_attachments") as batch:
        batch.drop_column("meta_data")
