"""Migration 0054: the table `file_nodes` (mailcore.filenodes) comes on the way up, empty,
and goes on the way down, on SQLite and on PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store.migrate import downgrade_to
from tests.support.db import DatabaseMixin

BEFORE = "0051_drop_secrets_removed"  # the revision 0054_file_nodes builds on


def thd_tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


class FileNodesMigrationMixin(DatabaseMixin):
    timeout = 120

    async def test_the_table_comes_empty_and_goes(self) -> None:
        db = await self.open_database_before(BEFORE)
        self.assertNotIn("file_nodes", await db.read("tables", thd_tables))
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("rows", lambda c: c.execute(
            text("SELECT count(*) FROM file_nodes")).scalar_one()), 0)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("file_nodes", await db.read("tables", thd_tables))


class SQLiteFileNodesMigrationTests(FileNodesMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresFileNodesMigrationTests(FileNodesMigrationMixin, TestCase):
    backend = "postgresql"
