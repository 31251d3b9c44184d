"""SQLite: the large columns of `messages` go last in its rows (issue 17.4).

SQLite stores a row's columns in their declared order and a value too long for the row's
page continues on overflow pages, a chain read page by page. The columns a list page reads
(thread_id, has_attachments, created_at, updated_at) came after body_text, body_html and
headers, so reading them walked the whole chain of every row with a long body: with 60 KB
bodies a page of 50 rows read 7 times slower (0.76 ms against 0.11 ms from the page cache,
and a disk read per overflow page when the pages are not cached). The text columns only a
message's detail and the full-text index read (cc, in_reply_to, references,
parse_problems, headers, body_text, body_html, search_extra) now come after every other
column, so a list, a count or a lookup reads the short head of each row only.

Upgrade (SQLite): the table is rebuilt in one transaction, as SQLite documents for a change
ALTER TABLE cannot make: a new table with the columns in the new order (the live table's
own column and constraint definitions, moved), every row copied with its id, the old table
dropped (foreign keys are off while migrations run, so nothing referencing a message is
deleted), the new one renamed, and the old table's indexes and triggers created again from
their stored SQL in the order they were first made (SQLite's planner, without statistics,
breaks ties between indexes by that order). The full-text index reads its text by row id
from the table named `messages` and stays valid. Needs free disk for a second copy of the
table while it runs (the old table's pages are reused by later rows; VACUUM returns them
to the filesystem) and takes about as long as copying it. PostgreSQL: nothing (a long
value is kept out of line there, in TOAST). Downgrade: nothing (the order has no meaning to
a query).

Revision ID: 0025_message_columns
Revises: 0024_search_order
"""

from __future__ import annotations

import re

from alembic import op

from mailcore.store.migrate import split_definitions

revision = "0025_message_columns"
down_revision = "0024_search_order"
branch_labels = None
depends_on = None

# The columns moved after all the others, in this order: short or rarely long first.
LAST = ("cc", "in_reply_to", "references", "parse_problems", "headers", "body_text",
        "body_html", "search_extra")
_CONSTRAINT = re.compile(r"(CONSTRAINT|PRIMARY|UNIQUE|FOREIGN|CHECK)\b", re.IGNORECASE)


def column_name(definition: str) -> str:
    first = definition.split(None, 1)[0]
    return first.strip('"`[]')


def reordered(create_sql: str, name: str) -> tuple[str, list[str]]:
    """`create_sql` (the table's CREATE TABLE) as CREATE TABLE `name`, the `LAST` columns
    moved after the others; and the column names in the new order."""
    _, _, rest = create_sql.partition("(")
    body = rest[: rest.rindex(")")]
    columns: list[str] = []
    constraints: list[str] = []
    for definition in split_definitions(body):
        (constraints if _CONSTRAINT.match(definition) else columns).append(definition)
    by_name = {column_name(c): c for c in columns}
    order = [n for n in by_name if n not in LAST] + [n for n in LAST if n in by_name]
    definitions = [by_name[n] for n in order] + constraints
    return (f'CREATE TABLE "{name}" (\n\t' + ",\n\t".join(definitions) + "\n)", order)


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name != "sqlite":
        return
    if conn.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError("0025 rebuilds messages: run it with foreign keys off "
                           "(mailcore.store.migrate does)")
    create_sql = conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'messages'").scalar()
    assert isinstance(create_sql, str)
    # Indexes and triggers of the table (automatic indexes of its UNIQUE constraints have
    # no SQL: the new table's constraints make them again), in the order they were made:
    # without statistics SQLite's planner breaks ties between equally good indexes by
    # that order, so another order would change query plans.
    dependents = [sql for (sql,) in conn.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE tbl_name = 'messages' "
        "AND type IN ('index', 'trigger') AND sql IS NOT NULL ORDER BY rowid")]
    new_sql, order = reordered(create_sql, "messages_new")
    names = ", ".join(f'"{n}"' for n in order)
    before = conn.exec_driver_sql("SELECT count(*) FROM messages").scalar()
    conn.exec_driver_sql(new_sql)
    conn.exec_driver_sql(
        f"INSERT INTO messages_new ({names}) SELECT {names} FROM messages ORDER BY id")
    conn.exec_driver_sql("DROP TABLE messages")
    # Legacy rename: only the table's own CREATE statement is rewritten; the references of
    # other tables and triggers already name "messages".
    conn.exec_driver_sql("PRAGMA legacy_alter_table=ON")
    try:
        conn.exec_driver_sql('ALTER TABLE messages_new RENAME TO messages')
    finally:
        conn.exec_driver_sql("PRAGMA legacy_alter_table=OFF")
    for sql in dependents:
        conn.exec_driver_sql(sql)
    after = conn.exec_driver_sql("SELECT count(*) FROM messages").scalar()
    broken = conn.exec_driver_sql("PRAGMA foreign_key_check(messages)").first()
    if after != before or broken is not None:
        raise RuntimeError(f"0025: messages rebuilt with {after} of {before} rows, "
                           f"first broken reference: {broken}")
    if conn.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").first() is not None:
        # Planner statistics (an operator's ANALYZE) went with the old table: make them again.
        conn.exec_driver_sql("ANALYZE messages")


def downgrade() -> None:
    pass
