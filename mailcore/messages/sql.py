"""Small helpers shared by the message store's transactions."""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import Connection


def dialect_insert(conn: Connection) -> Any:
    """The dialect's INSERT, which knows ON CONFLICT DO NOTHING."""
    from sqlalchemy.dialects import postgresql, sqlite

    return sqlite.insert if conn.dialect.name == "sqlite" else postgresql.insert


def new_id(result: Any) -> int:
    """The primary key of the row an INSERT created."""
    key = result.inserted_primary_key
    assert key is not None
    return int(key[0])


def utc(value: datetime.datetime | None) -> datetime.datetime | None:
    """SQLite hands back naive datetimes; every time we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=datetime.UTC)
    return value
