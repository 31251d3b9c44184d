"""Full-text search over subject, sender, recipient and bodies.

SQLite: an FTS5 table `messages_fts` whose rowid is the message row id, an external-content
index over the row's subject, sender, recipient, cc, body_text and search_extra (it keeps no
copy of the text); triggers on `messages` add, change and remove its entries with the rows,
whatever the writer (migration 0023). PostgreSQL: `message_search` with a weighted tsvector
and a GIN index (migration 0004) and each match's user and date (migration 0024), written
here. User input never reaches either query
language as syntax: it is cut into word tokens, each matched as a prefix, all required.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
from collections.abc import Sequence

from sqlalchemy import Column, Connection, Integer, MetaData, Table, bindparam, text
from sqlalchemy.sql.elements import ColumnElement

from mailcore.messages.parse import ParsedMessage, search_document

_WORD = re.compile(r"\w+", re.UNICODE)
MAX_TOKENS = 16
# PostgreSQL refuses a tsvector over 1 MB; index at most this much body text there.
_PG_BODY_CHARS = 256 * 1024

_meta = MetaData()
# Light handles on the dialect-specific tables, for use inside SQLAlchemy expressions.
_sqlite_fts = Table("messages_fts", _meta, Column("rowid", Integer))
_pg_search = Table("message_search", _meta, Column("message_row_id", Integer))


def tokens(query: str) -> list[str]:
    """The word tokens of a search query, lower-cased, at most MAX_TOKENS."""
    return [t.lower() for t in _WORD.findall(query)][:MAX_TOKENS]


def fold(text: str) -> str:
    """Words of `text` without diacritics, lower-cased, separated by spaces.

    PostgreSQL's 'simple' configuration keeps accents and reads `a@b.c` as one token;
    indexing and querying the folded words makes "reunion" find "Réunion" and "corp" find
    "zoe@corp.test", as SQLite's unicode61 tokenizer does.
    """
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(_WORD.findall(plain.lower()))


_PG_INSERT = text(
    "INSERT INTO message_search (message_row_id, user_id, date, document) VALUES (:id, "
    ":user_id, :date, "
    "setweight(to_tsvector('simple', :subject), 'A') || "
    "setweight(to_tsvector('simple', :people), 'B') || "
    "setweight(to_tsvector('simple', :body), 'C'))"
)


def thd_index_messages(
    conn: Connection, user_id: int,
    rows: Sequence[tuple[int, datetime.datetime | None, ParsedMessage]],
) -> None:
    """Add new message rows (row id, the row's date, the parsed message) of one user to the
    full-text index, in one statement (same transaction as the rows). SQLite: nothing to
    do, the rows' insert trigger has indexed them."""
    if not rows or conn.dialect.name == "sqlite":
        return
    params: list[dict[str, object]] = []
    for row_id, date, parsed in rows:
        subject, sender, recipient, body = search_document(parsed)
        params.append({"id": row_id, "user_id": user_id, "date": date,
                       "subject": fold(subject),
                       "people": f"{fold(sender)} {fold(recipient)}",
                       "body": fold(body[:_PG_BODY_CHARS])})
    conn.execute(_PG_INSERT, params)


def match_clause(dialect: str, id_column: ColumnElement[int], query: str) -> ColumnElement[bool]:
    """A WHERE clause: `id_column` is a message whose indexed text matches `query`.

    An empty token list matches nothing (a query of punctuation only finds no word).
    """
    words = tokens(query)
    if not words:
        return text("1 = 0")  # type: ignore[return-value]
    if dialect == "sqlite":
        fts_query = " AND ".join('"' + w.replace('"', "") + '"*' for w in words)
        sub = text("SELECT rowid FROM messages_fts WHERE messages_fts MATCH :fts").bindparams(
            bindparam("fts", fts_query)
        ).columns(_sqlite_fts.c.rowid)
        return id_column.in_(sub.subquery().select())
    ts_query = pg_tsquery(query)
    if ts_query is None:
        return text("1 = 0")  # type: ignore[return-value]
    sub = text(
        "SELECT message_row_id FROM message_search "
        "WHERE document @@ to_tsquery('simple', :tsq)"
    ).bindparams(bindparam("tsq", ts_query)).columns(_pg_search.c.message_row_id)
    return id_column.in_(sub.subquery().select())


def pg_tsquery(query: str) -> str | None:
    """PostgreSQL: the tsquery text of `query` (every folded word as a prefix, all
    required), None when it has no word."""
    folded = [f for w in tokens(query) for f in fold(w).split()][:MAX_TOKENS]
    return " & ".join(f"{w}:*" for w in folded) if folded else None


# PostgreSQL: one user's matches of :tsq, by `message_search` alone (migration 0024). The
# page's ids come in the list's order (newest first, or oldest first for `_OLDEST`), from
# the row (:mark_date, :mark_id) on in the `_FROM_MARK` forms, :skip skipped, :n of them.
_PG_MATCHES = ("FROM message_search WHERE document @@ to_tsquery('simple', :tsq) "
               "AND user_id = :user_id")
PG_MATCH_COUNT = text(f"SELECT count(*) {_PG_MATCHES}")


def pg_match_ids(oldest_first: bool, from_mark: bool) -> str:
    """The SQL of a page of match ids (see `_PG_MATCHES`)."""
    way, cmp = ("ASC", ">=") if oldest_first else ("DESC", "<=")
    mark = f" AND (date, message_row_id) {cmp} (:mark_date, :mark_id)" if from_mark else ""
    return (f"SELECT message_row_id {_PG_MATCHES}{mark} "
            f"ORDER BY date {way}, message_row_id {way} OFFSET :skip LIMIT :n")
