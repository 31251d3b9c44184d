"""Small helpers shared by the message store's transactions."""

from __future__ import annotations

import datetime
import sqlite3
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, DateTime, Table, func, select, text
from sqlalchemy.exc import OperationalError


def dialect_insert(conn: Connection) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT DO NOTHING."""
    from sqlalchemy.dialects import postgresql, sqlite

    return sqlite.insert if conn.dialect.name == "sqlite" else postgresql.insert


def new_id(result: Any) -> int:
    """The primary key of the row an INSERT created."""
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def allocate_ids(conn: Connection, table: Table, count: int) -> list[int]:
    """`count` new primary keys (ascending) for rows of `table` the caller inserts with them,
    so that a batch is written with one multi-row INSERT instead of one per row.

    PostgreSQL: taken from the column's sequence (as its default would). SQLite: the keys
    after the largest, as SQLite itself picks them; for a table with AUTOINCREMENT (messages
    and threads, migration 0069) after the largest ever given too (`sqlite_sequence`), or
    the id of a deleted newest row would be given again. The store's write transactions
    start with BEGIN IMMEDIATE, so no other writer comes in between.
    """
    if count <= 0:
        return []
    if conn.dialect.name == "postgresql":
        return sorted(int(v) for v in conn.execute(
            text("SELECT nextval(pg_get_serial_sequence(:t, 'id')) FROM generate_series(1, :n)"),
            {"t": table.name, "n": count},
        ).scalars())
    last = int(conn.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar() or 0)
    if table.dialect_options["sqlite"]["autoincrement"]:
        last = max(last, _sequence(conn, table.name))
    return list(range(last + 1, last + 1 + count))


def _sequence(conn: Connection, table: str) -> int:
    """The largest id SQLite's AUTOINCREMENT has given in `table` (0: none yet). A store
    whose schema is older than every AUTOINCREMENT table (0034) has no sqlite_sequence:
    only the migration tests run today's code on one, and nothing was given there."""
    try:
        given = conn.execute(text("SELECT seq FROM sqlite_sequence WHERE name = :t"),
                             {"t": table}).scalar()
    except OperationalError as e:
        if "no such table" not in str(e.orig):
            raise
        return 0
    return int(given or 0)


# Rows per multi-row INSERT on SQLite (also bounded by its limit on bound parameters).
_SQLITE_ROWS = 500


def insert_rows(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], *,
                skip_existing: bool = False) -> None:
    """INSERT `rows` (dicts with the same keys) into `table` in as few statements as the
    database allows; `skip_existing`: ON CONFLICT DO NOTHING.

    PostgreSQL: SQLAlchemy's executemany, which sends multi-row VALUES already. SQLite: the
    driver's executemany steps (and lets go of and takes back the GIL) once per row, and
    each taking back can wait a whole switch interval (5 ms) while a parsing thread holds
    the GIL; so the rows go as multi-row VALUES statements, each value converted by its
    column's bind processor as SQLAlchemy would.
    """
    if not rows:
        return
    if conn.dialect.name != "sqlite":
        statement = dialect_insert(conn)(table)
        if skip_existing:
            statement = statement.on_conflict_do_nothing()
        conn.execute(statement, list(rows))
        return
    names = list(rows[0])
    dialect = conn.dialect
    quote = dialect.identifier_preparer.quote
    pairs = []
    for n in names:
        column_type = table.c[n].type
        process = column_type._cached_bind_processor(dialect)
        # DateTime, or a type built on it (the schema's UTCDateTime): its processor is a
        # function of the value alone.
        datetimes = column_type._type_affinity is DateTime
        pairs.append((n, _once_per_object(process) if datetimes else process))
    head = f"INSERT INTO {quote(table.name)} ({', '.join(quote(n) for n in names)}) VALUES "
    sqlite_values(conn, head, len(names),
                  [[p(row[n]) if p is not None else row[n] for n, p in pairs] for row in rows],
                  " ON CONFLICT DO NOTHING" if skip_existing else "")


def _once_per_object(process: Any) -> Any:
    """`process` (a bind processor) run once per value object of one statement's rows: a
    batch's rows share one `now` in two or three columns each, and SQLite's DATETIME
    processor formats it through a dict of its fields (some 5 us a value). Keyed by
    identity, not equality: equal datetimes in other zones format to other strings (the
    values are held by the rows, so no id is reused meanwhile)."""
    if process is None:
        return None
    done: dict[int, Any] = {}

    def once(value: Any) -> Any:
        key = id(value)
        if key not in done:
            done[key] = process(value)
        return done[key]

    return once


def sqlite_values(conn: Connection, head: str, width: int, rows: Sequence[Sequence[Any]],
                  tail: str = "") -> None:
    """Run `head` + multi-row VALUES (+ `tail`) on SQLite for rows of `width` driver-ready
    values, as few statements as the limit on bound parameters allows."""
    limit = int(conn.connection.driver_connection.getlimit(  # type: ignore[union-attr]
        sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER))
    per = max(1, min(_SQLITE_ROWS, limit // width))
    one = "(" + ", ".join("?" * width) + ")"
    for start in range(0, len(rows), per):
        chunk = rows[start : start + per]
        conn.exec_driver_sql(head + ", ".join([one] * len(chunk)) + tail,
                             tuple(v for row in chunk for v in row))


def utc(value: datetime.datetime | None) -> datetime.datetime | None:
    """SQLite hands back naive datetimes; every time we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value
