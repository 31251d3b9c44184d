"""Migration 0054: the table `node_keys` (then mailcore.nodekeys; 0055 replaces it with
`nodes`) comes on the way up, empty, and goes on the way down, on SQLite and on
PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store.migrate import downgrade_to, upgrade_to
from tests.support.db import DatabaseMixin

BEFORE = "0053_mailbox_quota"  # the revision 0054 builds on
REVISION = "0054_node_keys"  # 0055 replaces its table: checked here as 0054 left it


def thd_tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def thd_count(conn: Connection) -> int:
    return int(conn.execute(text("SELECT count(*) FROM node_keys")).scalar_one())


class NodeKeysMigrationMixin(DatabaseMixin):
    timeout = 120

    async def test_the_table_comes_empty_and_goes(self) -> None:
        db = await self.open_database_before(BEFORE)
        self.assertNotIn("node_keys", await db.read("tables", thd_tables))
        await threads.deferToThread(upgrade_to, db.engine, REVISION)
        self.assertEqual(await db.read("rows", thd_count), 0)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("node_keys", await db.read("tables", thd_tables))


class SQLiteNodeKeysMigrationTests(NodeKeysMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresNodeKeysMigrationTests(NodeKeysMigrationMixin, TestCase):
    backend = "postgresql"
