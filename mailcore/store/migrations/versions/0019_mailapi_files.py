"""Mail API attachments (and inbox messages as received) kept on disk by content hash.

`mailapi_attachments.sha256` names the file `{data_dir}/mailapi/files/<sha256>` that holds an
attachment's bytes; `data` is then NULL (rows written before this revision keep their bytes
in `data` and are served from there). `mailapi_mail.raw_sha256` names the file of an inbox
message as it was received, shared by every recipient of that message (`raw` stays NULL).
Both are indexed for the sweep that removes files no row names any more.

`mailboxes.mail_count` is how many mail rows a mailbox holds (counted here, then kept by
the writers of mail rows), so that a listing's total is a sum over a few mailboxes instead
of a count over every mail.

Downgrading refuses while a row keeps its bytes on disk (the database alone cannot hold
them back).

Revision ID: 0019_mailapi_files
Revises: 0018_mailbox_jobs
"""

import sqlalchemy as sa
from alembic import op

revision = "0019_mailapi_files"
down_revision = "0018_mailbox_jobs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Batch mode: SQLite changes a column's nullability only by rebuilding the table.
    with op.batch_alter_table("mailapi_attachments") as batch:
        batch.add_column(sa.Column("sha256", sa.String(64), nullable=True))
        batch.alter_column("data", existing_type=sa.LargeBinary(), nullable=True)
    op.create_index("ix_mailapi_attachments_sha256", "mailapi_attachments", ["sha256"])
    with op.batch_alter_table("mailapi_mail") as batch:
        batch.add_column(sa.Column("raw_sha256", sa.String(64), nullable=True))
    op.create_index("ix_mailapi_mail_raw_sha256", "mailapi_mail", ["raw_sha256"])
    with op.batch_alter_table("mailboxes") as batch:
        batch.add_column(sa.Column("mail_count", sa.Integer(), nullable=False,
                                   server_default="0"))
    op.execute("UPDATE mailboxes SET mail_count = (SELECT count(*) FROM mailapi_mail"
               " WHERE mailapi_mail.mailbox_id = mailboxes.id)")


def downgrade() -> None:
    conn = op.get_bind()
    on_disk = conn.execute(sa.text(
        "SELECT (SELECT count(*) FROM mailapi_attachments WHERE sha256 IS NOT NULL)"
        " + (SELECT count(*) FROM mailapi_mail WHERE raw_sha256 IS NOT NULL)")).scalar_one()
    if on_disk:
        raise RuntimeError(f"{on_disk} Mail API rows keep their bytes on disk (data_dir/"
                           "mailapi/files); delete that mail before downgrading")
    with op.batch_alter_table("mailboxes") as batch:
        batch.drop_column("mail_count")
    op.drop_index("ix_mailapi_mail_raw_sha256", table_name="mailapi_mail")
    with op.batch_alter_table("mailapi_mail") as batch:
        batch.drop_column("raw_sha256")
    op.drop_index("ix_mailapi_attachments_sha256", table_name="mailapi_attachments")
    with op.batch_alter_table("mailapi_attachments") as batch:
        batch.alter_column("data", existing_type=sa.LargeBinary(), nullable=False)
        batch.drop_column("sha256")
