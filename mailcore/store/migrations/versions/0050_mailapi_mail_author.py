"""mailapi_mail.author_id: the user who put a mail in the outbox.

Outbox mail was sent whatever became of the user who put it there: a grantee whose
`allow_send` was revoked, or who was disabled, still had its queued mail sent as the
mailbox's address (it may wait long: behind a slow next hop, or while the mailbox's owner is
disabled). The sender now leaves out mail whose author is disabled (it waits), and a revoke
of `allow_send` sends that grantee's outbox mail in the mailbox back to the drafts
(mailcore.mailapi.mailboxes). A deleted user's mail keeps no author (SET NULL); its grants
went first, and its outbox mail with them.

Upgrade: the column (NULL for every row: mail put in the outbox before it is sent as
before) and its index (the user delete's SET NULL looks rows up by it). Downgrade: both go.

Revision ID: 0050_mailapi_mail_author
Revises: 0049_mailapi_usage
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0050_mailapi_mail_author"
down_revision = "0049_mailapi_usage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mailapi_mail") as batch:
        batch.add_column(sa.Column("author_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_mailapi_mail_author_id_users", "users", ["author_id"],
                                 ["id"], ondelete="SET NULL")
    op.create_index("ix_mailapi_mail_author_id", "mailapi_mail", ["author_id"])


def downgrade() -> None:
    op.drop_index("ix_mailapi_mail_author_id", table_name="mailapi_mail")
    with op.batch_alter_table("mailapi_mail") as batch:
        batch.drop_constraint("fk_mailapi_mail_author_id_users", type_="foreignkey")
        batch.drop_column("author_id")
