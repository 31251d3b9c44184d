"""PostgreSQL's full-text table knows each match's user and date (issue 17.4).

A search page wants the newest matches of one user. `message_search` held only the row id
and the tsvector, so every match was looked up in `messages` (its user and date) before the
newest could be picked: about 1,000 random row lookups for a rare word over a million
messages, most of the query's time. `message_search` now carries `user_id` and `date`,
copied from the message when it is indexed (neither ever changes on a stored message), so a
search with no other filter picks and counts its page from the matched index rows alone and
reads only the rows it shows.

Upgrade (PostgreSQL): the columns are added and filled from `messages` in one statement
(about two minutes per million messages on a small machine). SQLite: nothing; its FTS5
index is read through the rows' own columns.

Revision ID: 0024_search_order
Revises: 0023_backup_text
"""

from alembic import op

revision = "0024_search_order"
down_revision = "0023_backup_text"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.execute("ALTER TABLE message_search ADD COLUMN user_id INTEGER, "
               "ADD COLUMN date TIMESTAMP WITH TIME ZONE")
    op.execute("UPDATE message_search s SET user_id = m.user_id, date = m.date "
               "FROM messages m WHERE m.id = s.message_row_id")
    op.execute("ALTER TABLE message_search ALTER COLUMN user_id SET NOT NULL")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    op.execute("ALTER TABLE message_search DROP COLUMN date, DROP COLUMN user_id")
