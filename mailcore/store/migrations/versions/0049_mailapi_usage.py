"""mailapi_mail.size and mailboxes.used_bytes: what each Mail API mail takes, and each
mailbox in all, for the `[mailapi] mailbox_quota_bytes` limit.

A mailbox had no limit: one user (or anyone mailing a hosted address) could fill the disk
with drafts, attachments and received mail. A mail's size is the bytes it keeps: its text
fields (UTF-8), its attachments, and its message (as sent: `raw`; as received: the file
`raw_sha256` names). `mailboxes.used_bytes` is the sum over the mailbox's mail, kept by the
writers of mail rows in the transaction that changes it (mailcore.mailapi.counts), so that
a write checks the limit on one row instead of summing the mailbox's mail.

Upgrade: both columns, counted from the rows. A message received before this revision is
on disk only (the migration does not read the data directory): its mail counts its fields
and attachments, not that file. Downgrade: both columns go.

Revision ID: 0049_mailapi_usage
Revises: 0048_fetch_folder_skipped
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0049_mailapi_usage"
down_revision = "0048_fetch_folder_skipped"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mailapi_mail") as batch:
        batch.add_column(sa.Column("size", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("mailboxes") as batch:
        batch.add_column(sa.Column("used_bytes", sa.BigInteger(), nullable=False,
                                   server_default="0"))
    if op.get_bind().dialect.name == "postgresql":
        octets = "octet_length({})"
    else:  # SQLite's length() of text counts characters; of a blob, bytes
        octets = "length(CAST({} AS BLOB))"
    fields = " + ".join(octets.format(c) for c in (
        "mail_from", "to_addrs", "cc_addrs", "bcc_addrs", "reply_to", "subject", "body"))
    op.execute(
        f"UPDATE mailapi_mail SET size = {fields} + coalesce(length(raw), 0)"
        " + coalesce((SELECT sum(a.size) FROM mailapi_attachments a"
        " WHERE a.mail_id = mailapi_mail.id), 0)")
    op.execute("UPDATE mailboxes SET used_bytes = coalesce((SELECT sum(size) FROM mailapi_mail"
               " WHERE mailapi_mail.mailbox_id = mailboxes.id), 0)")


def downgrade() -> None:
    with op.batch_alter_table("mailboxes") as batch:
        batch.drop_column("used_bytes")
    with op.batch_alter_table("mailapi_mail") as batch:
        batch.drop_column("size")
