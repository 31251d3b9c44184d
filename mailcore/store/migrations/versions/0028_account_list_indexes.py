"""Lists of one account (or one of its folders) read through the account's own indexes.

A list filtered by account (the IMAP2API's `imap_server`, every Dropmyemail mailbox) was
read through the user's date index, the account's rows picked out as it went: a planner
without statistics (SQLite, PostgreSQL's generic plans) cannot tell the account's index is
narrower. For a small account whose mail is older than the user's other mail that walk
covered all of the other mail: 47 ms a page for 10 messages beside 100,000 (the page of a
million-message neighbour would cost ten times that). The list now finds an account's rows
through (account_id, folder, date) or (account_id, date), 0.4 ms either way: SQLite takes
them over the user's indexes, which are no narrower to it, and PostgreSQL's generic plan
prices them narrower (`mailcore.messages.store._shape_terms`).

Upgrade: (account_id, folder) is replaced by (account_id, folder, date), which serves
every use of it too, and (account_id, date) is added. Building them reads the table once
each (seconds per million messages). Downgrade: the old index again.

Revision ID: 0028_account_list_indexes
Revises: 0027_recipient_charged
"""

from __future__ import annotations

from alembic import op

revision = "0028_account_list_indexes"
down_revision = "0027_recipient_charged"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_messages_account_folder", table_name="messages")
    op.create_index("ix_messages_account_folder_date", "messages",
                    ["account_id", "folder", "date"])
    op.create_index("ix_messages_account_date", "messages", ["account_id", "date"])


def downgrade() -> None:
    op.drop_index("ix_messages_account_date", table_name="messages")
    op.drop_index("ix_messages_account_folder_date", table_name="messages")
    op.create_index("ix_messages_account_folder", "messages", ["account_id", "folder"])
