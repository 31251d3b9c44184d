"""Migration 0052: the tables `file_nodes` (then mailcore.filenodes; 0055 replaces it with
`nodes`) and `rate_buckets` (mailcore.ratelimits) come on the way up, empty, and go on the
way down, on SQLite and on PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store.migrate import downgrade_to, upgrade_to
from tests.support.db import DatabaseMixin

BEFORE = "0051_drop_secrets_removed"  # the revision 0052 builds on
REVISION = "0052_file_nodes_rate_buckets"  # 0055 replaces file_nodes: checked as 0052 left it


def thd_tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


def thd_count(conn: Connection, table: str) -> int:
    return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


class FileNodesMigrationMixin(DatabaseMixin):
    timeout = 120

    async def test_the_table_comes_empty_and_goes(self) -> None:
        db = await self.open_database_before(BEFORE)
        self.assertFalse({"file_nodes", "rate_buckets"} & await db.read("tables", thd_tables))
        await threads.deferToThread(upgrade_to, db.engine, REVISION)
        for table in ("file_nodes", "rate_buckets"):
            self.assertEqual(await db.read("rows", thd_count, table), 0)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertFalse({"file_nodes", "rate_buckets"} & await db.read("tables", thd_tables))


class SQLiteFileNodesMigrationTests(FileNodesMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresFileNodesMigrationTests(FileNodesMigrationMixin, TestCase):
    backend = "postgresql"
