"""Statements over many keys, asked a chunk of keys at a time.

A statement with an expanding bind parameter named "keys" (`col.in_(bindparam("keys",
expanding=True))`) is run once per KEY_CHUNK keys: SQLite refuses a statement with more
than 32,766 parameters (999 before 3.32), and PostgreSQL plans a huge IN list slowly.
Keys are asked in sorted order, each once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import Connection

KEY_CHUNK = 500


def key_chunks(keys: Iterable[Any]) -> Iterator[list[Any]]:
    """`keys`, each once and sorted, KEY_CHUNK at a time (for a statement that returns no
    rows, a DELETE, run once per chunk)."""
    ordered = sorted(set(keys))
    for i in range(0, len(ordered), KEY_CHUNK):
        yield ordered[i : i + KEY_CHUNK]


def rows_for(conn: Connection, statement: Any, params: dict[str, Any],
             keys: Iterable[Any]) -> Iterator[Any]:
    """The rows `statement` finds for `keys` (its expanding "keys"), asked in chunks."""
    for chunk in key_chunks(keys):
        yield from conn.execute(statement, {**params, "keys": chunk})


def found_keys(conn: Connection, statement: Any, params: dict[str, Any],
               keys: Iterable[Any]) -> set[Any]:
    """The first column of the rows the one-column `statement` finds for `keys`."""
    return {row[0] for row in rows_for(conn, statement, params, keys)}
