"""Migration 0046: `quarantine_digest_runs`, the latest digest run, so that a run cut short
is finished later. Up: the table, empty (a store migrated while no run is recorded has
nothing to resume); down: it goes, the held mail untouched.

Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import datetime

from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.gateway.quarantine import _start_run_txn, _unfinished_run_txn
from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from tests.support.db import DatabaseMixin

BEFORE = "0042_user_deleting"  # the revision 0046_quarantine_digest_runs builds on
START = 1_800_000_000.0


def thd_tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names())


class QuarantineDigestRunsMigrationMixin(DatabaseMixin):
    async def at_before(self) -> Database:
        return await self.open_database_before(BEFORE)

    async def test_up_the_table_is_there_empty_and_records_runs(self) -> None:
        db = await self.at_before()
        self.assertNotIn("quarantine_digest_runs", await db.read("tables", thd_tables))
        await threads.deferToThread(db.migrate_blocking)
        self.assertIsNone(await db.read("unfinished", _unfinished_run_txn))
        run = await db.run("start", _start_run_txn, "node-a", START, None)
        assert run is not None
        self.assertEqual(run.started_at,
                         datetime.datetime.fromtimestamp(START, datetime.UTC))
        self.assertEqual(await db.read("unfinished", _unfinished_run_txn), run)
        # A new run replaces it: one row, the latest.
        later = await db.run("start", _start_run_txn, "node-b", START + 86400, None)
        self.assertEqual(await db.read("count", lambda c: c.execute(text(
            "SELECT count(*) FROM quarantine_digest_runs")).scalar_one()), 1)
        self.assertEqual(await db.read("unfinished", _unfinished_run_txn), later)

    async def test_down_the_table_goes(self) -> None:
        db = await self.open_database()
        await db.run("start", _start_run_txn, "node-a", START, None)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("quarantine_digest_runs", await db.read("tables", thd_tables))
        await threads.deferToThread(db.migrate_blocking)
        self.assertIsNone(await db.read("unfinished", _unfinished_run_txn))


class SQLiteQuarantineDigestRunsMigrationTests(QuarantineDigestRunsMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresQuarantineDigestRunsMigrationTests(QuarantineDigestRunsMigrationMixin,
                                                 TestCase):
    backend = "postgresql"
