"""A plain list page's e-mails as the JSON array the IMAP2API's reply holds.

The e-mail list shows each message as `mailcore.webhooks.payload.email_json` does. Built in
Python, a page of 50 went from the database's rows to summaries (on SQLite, three times a
row parsed), to 50 dicts, to JSON again: Python work done under the interpreter's lock,
which is what the list waits for at 16 connections (the reactor thread needs it for every
request too). So a plain list page (no words, no thread grouping) can come back as that
JSON array, written by the database in the statement that picks the rows: the same bytes
`email_json` and orjson write (SQLite's JSON strings and PostgreSQL's `to_json` escape
what orjson's do, the same way; tests/test_messages_rendered holds them to it), in the
list's order. Over a million messages at 16 connections (the bench's stores, alternating
rounds), the first page went from 740-751 to 773-963 req/s on SQLite and from 488-660 to
766-856 on PostgreSQL; page 18,000 from 700-770 to 1,001-1,056 and from 343-548 to
619-730; 5-52 % less CPU a request.

The statement's one row: the array; whether every time in it was in the form the store
writes (SQLite; else the caller reads the page the usual way); how many rows it holds; and
the first and last rows' (date, id), which the caller remembers for keyset pages
(`mailcore.messages.keyset`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Integer,
    String,
    Text,
    and_,
    case,
    cast,
    false,
    func,
    literal_column,
    null,
    or_,
    select,
)
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
    """SQLite: a well-formed time as `payload.iso` writes it ('T' between day and time, a
    Z, the microseconds only when there are some), as text; NULL stays NULL."""
    day, clock = _substr(value, 1, 10), _substr(value, 12, 8)
    return case(
        (value.is_(None), null()),
        (_substr(value, 20) == _text(".000000"), day + _text("T") + clock + _text("Z")),
        else_=day + _text("T") + _substr(value, 12) + _text("Z"),
    )


def _pg_iso(value: ColumnElement[Any]) -> ColumnElement[Any]:
    """PostgreSQL: a time as `payload.iso` writes it (in UTC), as text; NULL stays NULL."""
    utc = func.timezone(_text("UTC"), value)
    whole = func.to_char(utc, _text('YYYY-MM-DD"T"HH24:MI:SS'))
    micro = func.to_char(utc, _text("US"))
    return case(
        (value.is_(None), null()),
        (micro == _text("000000"), func.concat(whole, _text("Z"))),
        else_=func.concat(whole, _text("."), micro, _text("Z")),
    )


def _fields(c: Any, dialect: str) -> list[tuple[str, ColumnElement[Any]]]:
    """`email_json`'s keys, in its order, and each one's value for a page row
    (`mailcore.messages.store._PAGE_COLUMNS`): text, numbers, NULL, and (PostgreSQL) a
    boolean; SQLite, which has none, gets `has_attachments` as a JSON value already."""
    has_attachments: ColumnElement[Any]
    if dialect == "postgresql":
        iso, has_attachments = _pg_iso, func.coalesce(c.has_attachments, false())
    else:
        iso, has_attachments = _iso, func.json(case(
            (c.has_attachments != literal_column("0", Integer), _text("true")),
            else_=_text("false")))
    return [
        ("id", c.id), ("message_id", c.message_id), ("subject", c.subject),
        ("sender", c.sender), ("recipient", c.recipient), ("date", iso(c.date)),
        ("folder", c.folder),
        ("thread_id", case((c.thread_id.is_(None), null()),
                           else_=_text("thread-").concat(c.thread_id))),
        ("thread_count", _thread_count(c)), ("imap_server", c.account_id),
        ("has_attachments", has_attachments),
    ]


def _email(c: Any, dialect: str) -> ColumnElement[Any]:
    """`email_json` of a page row: SQLite's `json_object`; on PostgreSQL compact JSON text
    of `to_json`'s values (its own json_build_object writes spaces after colons and
    commas; `to_json` escapes text as orjson does)."""
    fields = _fields(c, dialect)
    if dialect != "postgresql":
        return func.json_object(*(x for key, value in fields for x in (_text(key), value)))
    parts: list[Any] = []
    for key, value in fields:
        parts += [_text(("{" if not parts else ",") + f'"{key}":'),
                  func.coalesce(cast(func.to_json(value), Text), _text("null"))]
    return func.concat(*parts, _text("}"))


def _thread_count(c: Any) -> ColumnElement[int]:
    """The size of the row's thread (1 without a thread), as `_summary` counts it."""
    return case(
        (and_(c.thread_id.isnot(None), c.message_count.isnot(None)), c.message_count),
        else_=literal_column("1", Integer))


def email_array(rows: Subquery, order: list[Any], dialect: str) -> Select[Any]:
    """The one row of `rows` (a page of `_PAGE_COLUMNS`) in `order` (the list's own order,
    on `rows`' columns), for `dialect` (sqlite or postgresql): (JSON array, every time well
    formed (1/0), rows, first date, first id, last date, last id); no row when the page is
    empty."""
    c = rows.c

    def whole(fn: Any) -> Any:  # over every row of the page, in its order
        return fn.over(order_by=order, rows=(None, None))

    if dialect == "postgresql":
        array = func.concat(_text("["), whole(func.string_agg(_email(c, dialect), _text(","))),
                            _text("]"))
        ok: Any = literal_column("1", Integer)  # timestamptz: no other form
    else:
        array = whole(func.json_group_array(_email(c, dialect)))
        ok = whole(func.min(case(
            (or_(c.date.is_(None), _well_formed(c.date)), literal_column("1", Integer)),
            else_=literal_column("0", Integer))))
    return select(
        array.label("emails"), ok.label("well_formed"), whole(func.count()).label("n"),
        whole(func.first_value(c.date)).label("first_date"),
        whole(func.first_value(c.id)).label("first_id"),
        whole(func.last_value(c.date)).label("last_date"),
        whole(func.last_value(c.id)).label("last_id"),
    ).limit(1)
