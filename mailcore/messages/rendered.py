"""SQLite: a plain list page's e-mails as the JSON array the IMAP2API's reply holds.

The e-mail list shows each message as `mailcore.webhooks.payload.email_json` does. Built in
Python, a page of 50 went from SQLite's rows to summaries (three times a row parsed), to 50
dicts, to JSON again: Python work done under the interpreter's lock, which is what the list
waits for at 16 connections (the reactor thread needs it for every request too). So a plain
list page (no words, no thread grouping) can come back as that JSON array, written by
SQLite in the statement that picks the rows: the same bytes `email_json` and orjson write
(SQLite's JSON strings escape what orjson's do, the same way; tests/test_messages_rendered
holds them to it), in the list's order. Over a million messages at 16 connections (the
bench's store, alternating rounds) the first page went from 740-751 to 773-963 req/s, a
deep one from 700-770 to 1,001-1,056, with 5-24 % less CPU a request.

The statement's one row: the array; whether every time in it was in the form the store
writes (else the caller reads the page the usual way); how many rows it holds; and the
first and last rows' (date, id), which the caller remembers for keyset pages
(`mailcore.messages.keyset`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Integer, String, and_, case, func, literal_column, null, or_, select
from sqlalchemy.sql import ColumnElement, Select, Subquery


def _text(sql: str) -> ColumnElement[str]:
    """A string constant written into the SQL (no parameter to lay out per request)."""
    return literal_column("'" + sql.replace("'", "''") + "'", String)


def _substr(value: ColumnElement[Any], start: int, length: int | None = None
            ) -> ColumnElement[str]:
    args = [literal_column(str(start), Integer)]
    if length is not None:
        args.append(literal_column(str(length), Integer))
    return func.substr(value, *args, type_=String)


def _well_formed(value: ColumnElement[Any]) -> ColumnElement[bool]:
    """A time as the store writes it on SQLite: 'YYYY-MM-DD HH:MM:SS.ffffff' (UTC)."""
    return and_(func.length(value) == literal_column("26", Integer),
                _substr(value, 11, 1) == _text(" "), _substr(value, 20, 1) == _text("."))


def _iso(value: ColumnElement[Any]) -> ColumnElement[Any]:
    """A well-formed time as `payload.iso` writes it: 'T' between day and time, a Z, the
    microseconds only when there are some."""
    day, clock = _substr(value, 1, 10), _substr(value, 12, 8)
    return case(
        (value.is_(None), null()),
        (_substr(value, 20) == _text(".000000"), day + _text("T") + clock + _text("Z")),
        else_=day + _text("T") + _substr(value, 12) + _text("Z"),
    )


def _email(c: Any) -> ColumnElement[Any]:
    """`email_json` of a page row (the columns of `mailcore.messages.store._PAGE_COLUMNS`)."""
    thread_count = case(
        (and_(c.thread_id.isnot(None), c.message_count.isnot(None)), c.message_count),
        else_=literal_column("1", Integer))
    return func.json_object(
        _text("id"), c.id,
        _text("message_id"), c.message_id,
        _text("subject"), c.subject,
        _text("sender"), c.sender,
        _text("recipient"), c.recipient,
        _text("date"), _iso(c.date),
        _text("folder"), c.folder,
        _text("thread_id"), case(
            (c.thread_id.is_(None), null()), else_=_text("thread-").concat(c.thread_id)),
        _text("thread_count"), thread_count,
        _text("imap_server"), c.account_id,
        _text("has_attachments"), func.json(case(
            (c.has_attachments != literal_column("0", Integer), _text("true")),
            else_=_text("false"))),
    )


def email_array(rows: Subquery, order: list[Any]) -> Select[Any]:
    """The one row of `rows` (a page of `_PAGE_COLUMNS`) in `order` (the list's own order,
    on `rows`' columns): (JSON array, every time well formed (1/0), rows, first date,
    first id, last date, last id); no row when the page is empty."""
    c = rows.c

    def whole(fn: Any) -> Any:  # over every row of the page, in its order
        return fn.over(order_by=order, rows=(None, None))

    ok = case((or_(c.date.is_(None), _well_formed(c.date)), literal_column("1", Integer)),
              else_=literal_column("0", Integer))
    return select(
        whole(func.json_group_array(_email(c))), whole(func.min(ok)), whole(func.count()),
        whole(func.first_value(c.date)), whole(func.first_value(c.id)),
        whole(func.last_value(c.date)), whole(func.last_value(c.id)),
    ).limit(1)
