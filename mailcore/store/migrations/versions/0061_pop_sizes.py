"""The size POP3's LIST gave each message fetched by POP3 (`message_pop_sizes`).

A POP3 server may give a new message the UIDL of one deleted (RFC 1939 only asks a UIDL to
be unique while its message is in the maildrop); a sync that held the UIDL thought it had
the message and never fetched it. The size LIST gave when the message was fetched is kept
per copy, and a UIDL we hold listed with another size is fetched as the message it now is
(`mailcore.fetch.engine`). A table of its own beside `messages`: a column added to
`messages` goes after its long text on SQLite, which each sync's read of it would walk
(migration 0025).

Upgrade: the table, empty; the copies fetched before it take the size LIST gives at their
next sync. Downgrade: it goes.

Revision ID: 0061_pop_sizes
Revises: 0060_oauth_prune_indexes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0061_pop_sizes"
down_revision = "0060_oauth_prune_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "message_pop_sizes",
        sa.Column("message_row_id", sa.Integer(),
                  sa.ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("message_pop_sizes")
