"""Indexes and counts for the message APIs at scale (issue 17.4).

Counting a million rows is the cost of a folder list, the statistics and a list's `count`;
the database now keeps those counts itself, in step with every write whatever the writer,
through row triggers (SQLite triggers, PostgreSQL PL/pgSQL trigger functions):

- `message_counts`: messages per (user, account, folder); `account_key` is the account id,
  0 for messages outside any account. `changes` goes up with every insert, delete and move
  of a message, so the sum of a user's rows changes whenever the user's messages do.
  Rows that fall to zero stay (with `total` 0) so that `changes` never goes back.
- `threads.message_count`: the messages of each thread (kept on insert, delete and a change
  of `messages.thread_id`, merges included).
- `message_thread_totals`: per user, the threads holding at least one message (raised and
  lowered when a thread's count leaves or reaches zero, or a non-empty thread is deleted).

Indexes: `(thread_id, date)` replaces `(thread_id)` (a thread's messages in date order,
without walking the user's whole date index), and `(user_id, folder, date)` serves a folder's
page in date order.

Revision ID: 0020_message_read_indexes
Revises: 0019_mailapi_files
"""

import sqlalchemy as sa
from alembic import op

revision = "0020_message_read_indexes"
down_revision = "0019_mailapi_files"
branch_labels = None
depends_on = None

_KEY = "coalesce({row}.account_id, 0)"

# Statements shared by both dialects' trigger bodies; {row} is NEW or OLD.
_COUNT_UP = (
    "INSERT INTO message_counts (user_id, account_key, folder, total, changes) "
    "VALUES ({row}.user_id, " + _KEY + ", {row}.folder, 1, 1) "
    "ON CONFLICT (user_id, account_key, folder) DO UPDATE SET "
    "total = message_counts.total + 1, changes = message_counts.changes + 1"
)
_COUNT_DOWN = (
    "UPDATE message_counts SET total = total - 1, changes = changes + 1 "
    "WHERE user_id = {row}.user_id AND account_key = " + _KEY + " AND folder = {row}.folder"
)
_TOUCH = (
    "UPDATE message_counts SET changes = changes + 1 "
    "WHERE user_id = {row}.user_id AND account_key = " + _KEY + " AND folder = {row}.folder"
)
_THREAD_UP = "UPDATE threads SET message_count = message_count + 1 WHERE id = {row}.thread_id"
_THREAD_DOWN = "UPDATE threads SET message_count = message_count - 1 WHERE id = {row}.thread_id"
_TOTALS_ADD = (
    "INSERT INTO message_thread_totals (user_id, threads) VALUES (NEW.user_id, {delta}) "
    "ON CONFLICT (user_id) DO UPDATE SET "
    "threads = message_thread_totals.threads + {delta}"
)
_TOTALS_DOWN = (
    "UPDATE message_thread_totals SET threads = threads - 1 WHERE user_id = OLD.user_id"
)

# (name, table, event, condition, statements)
_TRIGGERS = [
    ("message_counts_insert", "messages", "INSERT", None,
     [_COUNT_UP.format(row="NEW"), _THREAD_UP.format(row="NEW")]),
    ("message_counts_delete", "messages", "DELETE", None,
     [_COUNT_DOWN.format(row="OLD"), _THREAD_DOWN.format(row="OLD")]),
    ("message_counts_move", "messages", "UPDATE OF user_id, account_id, folder, date",
     "OLD.user_id IS DISTINCT FROM NEW.user_id OR OLD.account_id IS DISTINCT FROM "
     "NEW.account_id OR OLD.folder IS DISTINCT FROM NEW.folder OR "
     "OLD.date IS DISTINCT FROM NEW.date",
     [_COUNT_DOWN.format(row="OLD"), _COUNT_UP.format(row="NEW")]),
    ("message_thread_move", "messages", "UPDATE OF thread_id",
     "OLD.thread_id IS DISTINCT FROM NEW.thread_id",
     [_THREAD_DOWN.format(row="OLD"), _THREAD_UP.format(row="NEW")]),
    # A message that changes thread (a merge) changes the thread list: bump `changes`. The
    # first assignment (from NULL, right after the insert) was counted by the insert.
    ("message_thread_touch", "messages", "UPDATE OF thread_id",
     "OLD.thread_id IS NOT NULL AND OLD.thread_id IS DISTINCT FROM NEW.thread_id",
     [_TOUCH.format(row="NEW")]),
    ("thread_totals_update", "threads", "UPDATE OF message_count",
     "(OLD.message_count > 0) <> (NEW.message_count > 0)",
     [_TOTALS_ADD.format(delta="(CASE WHEN NEW.message_count > 0 THEN 1 ELSE -1 END)")]),
    ("thread_totals_insert", "threads", "INSERT", "NEW.message_count > 0",
     [_TOTALS_ADD.format(delta="1")]),
    ("thread_totals_delete", "threads", "DELETE", "OLD.message_count > 0", [_TOTALS_DOWN]),
]


def _create_triggers(dialect: str) -> None:
    for name, table, event, when, statements in _TRIGGERS:
        if dialect == "sqlite":
            condition = f" WHEN {when.replace('IS DISTINCT FROM', 'IS NOT')}" if when else ""
            body = "; ".join(statements)
            op.execute(
                f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW{condition} "
                f"BEGIN {body}; END"
            )
        else:
            body = "; ".join(statements)
            op.execute(
                f"CREATE FUNCTION {name}_fn() RETURNS trigger LANGUAGE plpgsql AS $$ "
                f"BEGIN {body}; RETURN NULL; END $$"
            )
            condition = f" WHEN ({when})" if when else ""
            op.execute(
                f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW{condition} "
                f"EXECUTE FUNCTION {name}_fn()"
            )


def _drop_triggers(dialect: str) -> None:
    for name, table, _event, _when, _statements in reversed(_TRIGGERS):
        if dialect == "sqlite":
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {name}_fn()")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.drop_index("ix_messages_thread_id", table_name="messages")
    op.create_index("ix_messages_thread_date", "messages", ["thread_id", "date"])
    op.create_index("ix_messages_user_folder_date", "messages", ["user_id", "folder", "date"])
    op.create_table(
        "message_counts",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("account_key", sa.Integer(), nullable=False),
        sa.Column("folder", sa.String(1024), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("changes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"],
                                name=op.f("fk_message_counts_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "account_key", "folder",
                                name=op.f("pk_message_counts")),
    )
    op.create_table(
        "message_thread_totals",
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("threads", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"],
                                name=op.f("fk_message_thread_totals_user_id_users"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_message_thread_totals")),
    )
    with op.batch_alter_table("threads") as batch:
        batch.add_column(sa.Column("message_count", sa.BigInteger(), nullable=False,
                                   server_default="0"))
    # The counts of the messages already stored, then the triggers that keep them.
    op.execute(
        "INSERT INTO message_counts (user_id, account_key, folder, total, changes) "
        "SELECT user_id, coalesce(account_id, 0), folder, count(*), count(*) FROM messages "
        "GROUP BY user_id, coalesce(account_id, 0), folder"
    )
    op.execute(
        "UPDATE threads SET message_count = "
        "(SELECT count(*) FROM messages WHERE messages.thread_id = threads.id)"
    )
    op.execute(
        "INSERT INTO message_thread_totals (user_id, threads) "
        "SELECT user_id, count(*) FROM threads WHERE message_count > 0 GROUP BY user_id"
    )
    _create_triggers(dialect)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    _drop_triggers(dialect)
    with op.batch_alter_table("threads") as batch:
        batch.drop_column("message_count")
    op.drop_table("message_thread_totals")
    op.drop_table("message_counts")
    op.drop_index("ix_messages_user_folder_date", table_name="messages")
    op.drop_index("ix_messages_thread_date", table_name="messages")
    op.create_index("ix_messages_thread_id", "messages", ["thread_id"])
