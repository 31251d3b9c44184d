"""The Mail API's outbox is sent in the order mail entered it, not the order it was created.

The sender took outbox rows by `id`, the order of creation: a draft written before a mail
that was posted straight to the outbox, and put in the outbox after it, went out first.
`mailapi_mail.outbox_seq` is now given when a mail enters the outbox, in the transaction
that puts it there, from the database: a PostgreSQL sequence (`mailapi_outbox_seq`), on
SQLite the change counter of that name (SQLite's writers take turns, so one row is no
contention there). The index the sender reads through, (status, mailbox_id, id), becomes
(status, mailbox_id, outbox_seq).

Upgrade: mail already in the outbox gets its `id` as its place, which keeps the order it was
going to be sent in; the sequence (the counter) starts after the largest. Other rows keep no
place (NULL): only outbox mail is read in this order. Downgrade: the column, the sequence
(the counter) and the index go; the old index comes back.

Revision ID: 0029_mailapi_outbox_order
Revises: 0028_account_list_indexes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0029_mailapi_outbox_order"
down_revision = "0028_account_list_indexes"
branch_labels = None
depends_on = None

SEQUENCE = "mailapi_outbox_seq"  # also the SQLite change counter's name


def upgrade() -> None:
    op.add_column("mailapi_mail", sa.Column("outbox_seq", sa.BigInteger(), nullable=True))
    conn = op.get_bind()
    conn.execute(sa.text("UPDATE mailapi_mail SET outbox_seq = id WHERE status = 'outbox'"))
    last = int(conn.execute(sa.text("SELECT max(outbox_seq) FROM mailapi_mail")).scalar()
               or 0)
    if conn.dialect.name == "postgresql":
        op.execute(f"CREATE SEQUENCE {SEQUENCE} START WITH {last + 1}")
    else:
        conn.execute(sa.text("INSERT INTO change_counters (name, value) VALUES (:n, :v)"),
                     {"n": SEQUENCE, "v": last})
    op.drop_index("ix_mailapi_mail_status", table_name="mailapi_mail")
    op.create_index("ix_mailapi_mail_outbox", "mailapi_mail",
                    ["status", "mailbox_id", "outbox_seq"])


def downgrade() -> None:
    op.drop_index("ix_mailapi_mail_outbox", table_name="mailapi_mail")
    op.create_index("ix_mailapi_mail_status", "mailapi_mail", ["status", "mailbox_id", "id"])
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        op.execute(f"DROP SEQUENCE {SEQUENCE}")
    else:
        conn.execute(sa.text("DELETE FROM change_counters WHERE name = :n"), {"n": SEQUENCE})
    op.drop_column("mailapi_mail", "outbox_seq")
