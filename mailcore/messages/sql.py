"""Small helpers shared by the message store's transactions."""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import Connection, Table, func, select, text


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
    after the largest, as SQLite itself picks them (no AUTOINCREMENT); the store's write
    transactions start with BEGIN IMMEDIATE, so no other writer comes in between.
    """
    if count <= 0:
        return []
    if conn.dialect.name == "postgresql":
        return sorted(int(v) for v in conn.execute(
            text("SELECT nextval(pg_get_serial_sequence(:t, 'id')) FROM generate_series(1, :n)"),
            {"t": table.name, "n": count},
        ).scalars())
    first = int(conn.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar() or 0) + 1
    return list(range(first, first + count))


def utc(value: datetime.datetime | None) -> datetime.datetime | None:
    """SQLite hands back naive datetimes; every time we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value
