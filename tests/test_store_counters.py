"""Change counters (mailcore.store.counters) on SQLite and PostgreSQL: a raise answers the
new value, the first raise makes the row, a read of a missing counter is 0, and a raise in
a transaction that fails is undone with it."""

from __future__ import annotations

from sqlalchemy import Connection
from twisted.trial.unittest import TestCase

from mailcore.store.counters import thd_bump_counter, thd_read_counter
from tests.support.db import MixinBase, open_database


class _Undone(Exception):
    pass


class CounterTestsMixin(MixinBase):
    backend = ""

    async def test_raise_answers_new_value(self) -> None:
        db = await open_database(self, self.backend)
        self.assertEqual(await db.read("r", thd_read_counter, "t.missing"), 0)
        self.assertEqual(await db.run("b", thd_bump_counter, "t.c"), 1)
        self.assertEqual(await db.run("b", thd_bump_counter, "t.c"), 2)

        def twice(conn: Connection) -> tuple[int, int, int]:
            return (thd_bump_counter(conn, "t.c"), thd_bump_counter(conn, "t.c"),
                    thd_read_counter(conn, "t.c"))

        self.assertEqual(await db.run("b2", twice), (3, 4, 4))
        # Counters are independent of one another.
        self.assertEqual(await db.run("b", thd_bump_counter, "t.other"), 1)
        self.assertEqual(await db.read("r", thd_read_counter, "t.c"), 4)

    async def test_raise_undone_with_its_transaction(self) -> None:
        db = await open_database(self, self.backend)
        await db.run("b", thd_bump_counter, "t.c")

        def fails(conn: Connection) -> None:
            thd_bump_counter(conn, "t.c")
            thd_bump_counter(conn, "t.new")
            raise _Undone()

        with self.assertRaises(_Undone):
            await db.run("fails", fails)
        self.assertEqual(await db.read("r", thd_read_counter, "t.c"), 1)
        self.assertEqual(await db.read("r", thd_read_counter, "t.new"), 0)
        self.assertEqual(await db.run("b", thd_bump_counter, "t.new"), 1)


class SQLiteCounterTests(CounterTestsMixin, TestCase):
    backend = "sqlite"


class PostgresCounterTests(CounterTestsMixin, TestCase):
    backend = "postgresql"
    timeout = 60
