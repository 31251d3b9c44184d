"""Prepared statements (mailcore.store.prepared) on a real backend: the rows SQLAlchemy would
give, the parameters its types convert, driver errors raised as SQLAlchemy raises them, a
dead PostgreSQL connection replaced. Every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Integer,
    MetaData,
    Table,
    bindparam,
    func,
    insert,
    select,
)
from sqlalchemy.exc import DBAPIError
from twisted.trial.unittest import TestCase

from mailcore.store.prepared import Prepared, _Compiled
from mailcore.store.schema import users
from tests.support.db import DatabaseMixin

_DAY = datetime.datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=datetime.UTC)

# Made on the first user created at or before :at whose name is not "nobody" (a literal
# the statement carries: it is bound with no value from the caller), :n of them.
_USERS = Prepared(
    select(users.c.id, users.c.username)
    .where(users.c.created_at <= bindparam("at", type_=users.c.created_at.type),
           users.c.username != "nobody")
    .order_by(users.c.id).limit(bindparam("n")))


def _add_users(conn: Connection) -> None:
    for n, name in enumerate(["ann", "nobody", "bob", "cy", "dee"]):
        conn.execute(insert(users).values(
            username=name, email=f"{name}@example.test", nic=f"MC-{name}",
            created_at=_DAY + datetime.timedelta(hours=n)))


class PreparedTestsMixin(DatabaseMixin):
    async def test_rows_are_sqlalchemys_with_the_same_parameters(self) -> None:
        db = await self.open_database()
        await db.run("users", _add_users)

        def both(conn: Connection, values: dict[str, Any]) -> tuple[list[Any], list[Any]]:
            ours = _USERS.rows(conn, values)
            theirs = [tuple(r) for r in conn.execute(_USERS.statement, values)]
            return ours, theirs

        for at, n in [(_DAY + datetime.timedelta(hours=2), 10),  # the time's microseconds
                      (_DAY + datetime.timedelta(hours=2, microseconds=-1), 10),
                      (_DAY + datetime.timedelta(days=1), 2), (_DAY, 0)]:
            ours, theirs = await db.read("both", both, {"at": at, "n": n})
            self.assertEqual(ours, theirs)
        ours, _ = await db.read("both", both, {"at": _DAY + datetime.timedelta(hours=2), "n": 9})
        self.assertEqual([name for _, name in ours], ["ann", "bob"])
        for row in ours:
            self.assertIsInstance(row, tuple)

    async def test_a_driver_error_is_raised_as_sqlalchemy_raises_it(self) -> None:
        db = await self.open_database()
        missing = Table("no_such_table", MetaData(), Column("id", Integer))
        statement = Prepared(select(missing.c.id).where(missing.c.id == bindparam("id")))
        with self.assertRaises(DBAPIError) as raised:
            await db.read("missing", statement.rows, {"id": 1})
        self.assertFalse(raised.exception.connection_invalidated)
        self.assertIn("no_such_table", str(raised.exception))
        # The store reads on afterwards (the failed transaction was rolled back).
        self.assertEqual(await db.read("users", _USERS.rows, {"at": _DAY, "n": 5}), [])

    async def test_expanding_parameters_are_refused(self) -> None:
        db = await self.open_database()
        statement = Prepared(select(users.c.id).where(
            users.c.id.in_(bindparam("ids", expanding=True))))
        with self.assertRaises(ValueError):
            await db.read("ids", statement.rows, {"ids": [1]})

    async def test_parameters_are_positional_for_the_driver(self) -> None:
        """Compiled for the driver's positional style (psycopg: "format", not SQLAlchemy's
        "pyformat"), so the driver gets a list it need not lay out again."""
        db = await self.open_database()
        compiled = _Compiled(_USERS.statement, db.engine.dialect)
        self.assertTrue(compiled.positional)
        at = _DAY + datetime.timedelta(hours=2)
        parameters = compiled.parameters({"at": at, "n": 3})
        self.assertIsInstance(parameters, list)
        self.assertEqual(parameters[1:3], ["nobody", 3])
        self.assertEqual(db.engine.dialect.paramstyle,
                         "pyformat" if self.backend == "postgresql" else "qmark")


class SQLitePreparedTests(PreparedTestsMixin, TestCase):
    backend = "sqlite"


class PostgreSQLPreparedTests(PreparedTestsMixin, TestCase):
    backend = "postgresql"

    async def test_binary_results_are_sqlalchemys_values(self) -> None:
        """psycopg reads the rows in its binary format (no text to parse for a number or
        a time); the values are those SQLAlchemy reads: times aware in UTC, booleans,
        NULL, text."""
        db = await self.open_database()
        await db.run("users", _add_users)
        statement = Prepared(
            select(users.c.id, users.c.username, users.c.is_active, users.c.created_at,
                   users.c.password_hash, func.length(users.c.email))
            .where(users.c.id >= bindparam("first")).order_by(users.c.id))

        def both(conn: Connection) -> tuple[list[Any], list[Any]]:
            values = {"first": 0}
            return (statement.rows(conn, values),
                    [tuple(r) for r in conn.execute(statement.statement, values)])

        ours, theirs = await db.read("both", both)
        self.assertEqual(ours, theirs)
        self.assertEqual(len(ours), 5)
        for row in ours:
            self.assertIs(row[2], True)
            self.assertIs(row[3].tzinfo, datetime.UTC)
            self.assertIsNone(row[4])

    async def test_a_dead_connection_is_replaced_and_the_read_made_again(self) -> None:
        db = await self.open_database(max_threads=1)  # one thread: one read connection
        await db.run("users", _add_users)
        pid = await db.read("pid", lambda conn: conn.exec_driver_sql(
            "SELECT pg_backend_pid()").scalar_one())
        await db.run("kill", lambda conn: conn.exec_driver_sql(
            f"SELECT pg_terminate_backend({pid:d})"))
        rows = await db.read("users", _USERS.rows, {"at": _DAY, "n": 5})
        self.assertEqual([name for _, name in rows], ["ann"])
        self.assertNotEqual(await db.read("pid", lambda conn: conn.exec_driver_sql(
            "SELECT pg_backend_pid()").scalar_one()), pid)
