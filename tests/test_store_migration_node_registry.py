"""Migration 0055: the tables `file_nodes` and `node_keys` give way to `nodes` (the node
registry, mailcore.nodes). What the two held only said which nodes ran lately: they go with
their rows, `nodes` comes empty; on the way down `nodes` goes and the two come back empty,
on SQLite and on PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store.migrate import downgrade_to, upgrade_to
from tests.support.db import DatabaseMixin

BEFORE = "0054_node_keys"  # the revision 0055_node_registry builds on
REVISION = "0055_node_registry"
OLD = {"file_nodes", "node_keys"}


def thd_tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def thd_count(conn: Connection, table: str) -> int:
    return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def thd_add_nodes(conn: Connection) -> None:
    """Blocking: a running node as 0054 records it, in both tables."""
    conn.execute(text("INSERT INTO file_nodes (node_id, marker, seen_at) "
                      "VALUES ('node-a', 'abc', 1.0)"))
    conn.execute(text("INSERT INTO node_keys (node_id, name, fingerprints, seen_at) "
                      "VALUES ('node-a', 'pages.key', 'f00d', 1.0)"))


class NodeRegistryMigrationMixin(DatabaseMixin):
    timeout = 120

    async def test_two_tables_give_way_to_one_and_come_back(self) -> None:
        db = await self.open_database_before(BEFORE)
        self.assertNotIn("nodes", await db.read("tables", thd_tables))
        await db.run("nodes", thd_add_nodes)
        await threads.deferToThread(upgrade_to, db.engine, REVISION)
        tables = await db.read("tables", thd_tables)
        self.assertFalse(OLD & tables)
        self.assertEqual(await db.read("rows", thd_count, "nodes"), 0)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        tables = await db.read("tables", thd_tables)
        self.assertNotIn("nodes", tables)
        for table in OLD:
            self.assertEqual(await db.read("rows", thd_count, table), 0)
        await threads.deferToThread(db.migrate_blocking)  # and up again, to head
        self.assertFalse(OLD & await db.read("tables", thd_tables))


class SQLiteNodeRegistryMigrationTests(NodeRegistryMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresNodeRegistryMigrationTests(NodeRegistryMigrationMixin, TestCase):
    backend = "postgresql"
