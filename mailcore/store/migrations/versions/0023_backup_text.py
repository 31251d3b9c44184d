"""The SQLite full-text index keeps no copy of the messages' text (issue 17.1).

`messages_fts` was an ordinary FTS5 table: besides its index it stored subject, sender,
recipients and the whole body text again, next to the same text in `messages` (about a
quarter of the bytes a backup writes per message). It is now an external-content FTS5 table
over columns of `messages`: subject, sender, recipient, cc, body_text and the new
`search_extra` (the HTML body's text and the attachments' file names, "" for a plain-text
message). Triggers on `messages` index a row when it is inserted, re-index it when one of
those columns changes and remove it (FTS5's 'delete' with the old values) when it is
deleted, cascades included, so no writer can leave the index out of step.

Upgrade: `search_extra` is added and filled for the rows with an HTML body or a named
attachment (1,000 rows a step), then (SQLite) the old table goes and the new one is filled
from the rows, 10,000 ids a step. PostgreSQL keeps its tsvector table; it gets the column.

Revision ID: 0023_backup_text
Revises: 0021_fetch_bulk
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from mailcore.messages.parse import html_to_text
from mailcore.text import storable

revision = "0023_backup_text"
# 0022 was reserved for the token charges (issue 17.2), which needed no schema change.
down_revision = "0021_fetch_bulk"
branch_labels = None
depends_on = None

_TOKENIZE = "tokenize='unicode61 remove_diacritics 2'"
_COLUMNS = ("subject", "sender", "recipient", "cc", "body_text", "search_extra")
_NAMES = ", ".join(_COLUMNS)


def _values(row: str) -> str:
    return ", ".join(f"{row}.{c}" for c in _COLUMNS)


_INDEX_NEW = f"INSERT INTO messages_fts (rowid, {_NAMES}) VALUES (new.id, {_values('new')})"
_UNINDEX_OLD = (
    f"INSERT INTO messages_fts (messages_fts, rowid, {_NAMES}) "
    f"VALUES ('delete', old.id, {_values('old')})"
)
_TRIGGERS = {
    "messages_fts_insert": f"AFTER INSERT ON messages BEGIN {_INDEX_NEW}; END",
    "messages_fts_delete": f"AFTER DELETE ON messages BEGIN {_UNINDEX_OLD}; END",
    "messages_fts_update": (
        f"AFTER UPDATE OF id, {_NAMES} ON messages BEGIN {_UNINDEX_OLD}; {_INDEX_NEW}; END"
    ),
}
_FILL_ROWS = 1000
_INDEX_IDS = 10000


def _fill_search_extra(conn: sa.Connection) -> None:
    """search_extra of the stored rows that have an HTML body or a named attachment."""
    after = 0
    while True:
        rows: Sequence[Any] = conn.execute(sa.text(
            "SELECT id, body_html FROM messages WHERE id > :after AND (body_html != '' OR "
            "id IN (SELECT message_row_id FROM message_attachments WHERE filename != '')) "
            "ORDER BY id LIMIT :n"
        ), {"after": after, "n": _FILL_ROWS}).all()
        if not rows:
            return
        names: dict[int, list[str]] = {}
        for named, filename in conn.execute(sa.text(
            "SELECT message_row_id, filename FROM message_attachments "
            "WHERE message_row_id >= :lo AND message_row_id <= :hi AND filename != '' "
            "ORDER BY id"
        ), {"lo": rows[0][0], "hi": rows[-1][0]}):
            names.setdefault(named, []).append(filename)
        updates = []
        for row_id, html in rows:
            text = html_to_text(html) if html else ""
            extra = storable(f"{text}\n{' '.join(names.get(row_id, []))}".strip())
            if extra:
                updates.append({"i": row_id, "v": extra})
        if updates:
            conn.execute(sa.text("UPDATE messages SET search_extra = :v WHERE id = :i"), updates)
        after = rows[-1][0]


def _by_id_ranges(conn: sa.Connection, statement: str) -> None:
    """Run `statement` (with :lo and :hi) over the message ids, _INDEX_IDS at a time."""
    top = conn.execute(sa.text("SELECT coalesce(max(id), 0) FROM messages")).scalar() or 0
    for lo in range(0, int(top), _INDEX_IDS):
        conn.execute(sa.text(statement), {"lo": lo, "hi": lo + _INDEX_IDS})


def upgrade() -> None:
    conn = op.get_bind()
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("search_extra", sa.Text(), nullable=False,
                                   server_default=""))
    _fill_search_extra(conn)
    if conn.dialect.name != "sqlite":
        return
    op.execute("DROP TRIGGER IF EXISTS messages_fts_delete")
    op.execute("DROP TABLE IF EXISTS messages_fts")
    op.execute(
        f"CREATE VIRTUAL TABLE messages_fts USING fts5({_NAMES}, content='messages', "
        f"content_rowid='id', {_TOKENIZE})"
    )
    _by_id_ranges(conn, f"INSERT INTO messages_fts (rowid, {_NAMES}) SELECT id, {_NAMES} "
                        "FROM messages WHERE id > :lo AND id <= :hi")
    for name, body in _TRIGGERS.items():
        op.execute(f"CREATE TRIGGER {name} {body}")


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "sqlite":
        for name in _TRIGGERS:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS messages_fts")
        op.execute(
            "CREATE VIRTUAL TABLE messages_fts USING fts5("
            f"subject, sender, recipient, body, {_TOKENIZE})"
        )
        _by_id_ranges(
            conn,
            "INSERT INTO messages_fts (rowid, subject, sender, recipient, body) "
            "SELECT id, subject, sender, trim(recipient || ' ' || cc), "
            "trim(body_text || char(10) || search_extra) FROM messages "
            "WHERE id > :lo AND id <= :hi",
        )
        op.execute(
            "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN "
            "DELETE FROM messages_fts WHERE rowid = old.id; END"
        )
    op.drop_column("messages", "search_extra")
