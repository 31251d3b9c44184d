"""Statements compiled once and run straight on the driver, for reads made on every request.

`conn.execute(statement, values)` costs SQLAlchemy's own work each time, even with the
statement's compiled form cached: the cache key, the parameters, an execution context, the
events, a result object. A list page ran two statements this way, and on 16 connections
over a million messages that work was a third of what the reading thread did while holding
Python's lock (py-spy). A `Prepared` statement is compiled once per dialect; running it is
the driver's `execute` with its parameters in the compiled order, inside the transaction
`conn` is in (psycopg: its results in binary format).

What it gives up, so what a statement run this way must allow:
- no result processing: its columns must come back from the driver as the caller wants
  them (integers and text; no times on SQLite, where SQLAlchemy would parse them);
- no expanding (`IN`) parameters and none rendered into the SQL at execution;
- SQLAlchemy's error handling: a driver error is wrapped here (`DBAPIError`, as the
  store's retries expect), the connection invalidated when the driver says it is gone,
  but no `handle_error` event is run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import Select


def _positional(dialect: Dialect) -> Dialect:
    """`dialect`, compiling positional parameters where its driver takes them too."""
    if dialect.paramstyle != "pyformat":
        return dialect
    # A copy: the engine's dialect as it was set up for its server, another style.
    positional = copy.copy(dialect)
    positional.paramstyle, positional.positional = "format", True
    return positional


class _Compiled:
    """A statement's SQL for one dialect, how to lay out its parameters and how to open
    the driver's cursor for it."""

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        # Positional parameters where the driver takes both ("format" for psycopg, whose
        # SQLAlchemy style is "pyformat"): it would otherwise lay a dict out in the SQL's
        # order on every execute, in Python.
        compiled = statement.compile(dialect=_positional(dialect))
        binds = compiled.binds
        if any(b.expanding or b.literal_execute for b in binds.values()):
            raise ValueError("a prepared statement takes no expanding or literal parameters")
        self.sql = compiled.string
        self.positional = compiled.positional
        # psycopg: rows in PostgreSQL's binary format, whose numbers and times its loaders
        # read without parsing text (a list page's 50 rows, three times each).
        self.cursor_options: dict[str, Any] = (
            {"binary": True} if dialect.driver == "psycopg" else {})
        # Each parameter's name in the SQL (all of them, in order, when positional), the
        # value it has when the caller gives none (a literal in the statement), and the
        # conversion its type makes for this dialect.
        names = list(compiled.positiontup or []) if compiled.positional else list(binds)
        self.layout: list[tuple[str, str, Any, Callable[[Any], Any] | None]] = []
        for name in names:
            bind = binds[name]
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            value = None if bind.required else bind.effective_value
            self.layout.append((name, bind.key, value, processor))

    def parameters(self, values: Mapping[str, Any]) -> Any:
        """The driver's parameters: a list in the SQL's order, or a dict by name."""
        laid = [(name, value if processor is None else processor(value))
                for name, key, default, processor in self.layout
                for value in (values.get(key, default),)]
        return [value for _, value in laid] if self.positional else dict(laid)


class Prepared:
    """`statement` (a SELECT) compiled once per dialect and run on the driver (see the
    module docstring). Thread-safe: compiling twice at once only does the work twice."""

    def __init__(self, statement: Select[Any]) -> None:
        self.statement = statement
        self._compiled: dict[str, _Compiled] = {}

    def rows(self, conn: Connection, values: Mapping[str, Any]) -> list[Any]:
        """Every row of the statement with `values`, as the driver returns them (tuples)."""
        dialect = conn.dialect
        compiled = self._compiled.get(dialect.name)
        if compiled is None:
            compiled = self._compiled[dialect.name] = _Compiled(self.statement, dialect)
        parameters = compiled.parameters(values)
        driver: Any = conn.connection.driver_connection
        cursor = None
        try:
            cursor = driver.cursor(**compiled.cursor_options)
            cursor.execute(compiled.sql, parameters)
            return cursor.fetchall()  # type: ignore[no-any-return]
        except dialect.loaded_dbapi.Error as e:
            # Raised as `conn.execute` would: wrapped, the connection invalidated when the
            # error says it is gone (the store then reads again on a new one).
            gone = dialect.is_disconnect(e, driver, cursor)
            if gone:
                conn.invalidate(e)
            raise DBAPIError.instance(
                compiled.sql, parameters, e, dialect.loaded_dbapi.Error,
                connection_invalidated=gone, dialect=dialect) from e
        finally:
            if cursor is not None:
                cursor.close()
