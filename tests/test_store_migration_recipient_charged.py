"""Migration 0027: a queued recipient's `charged` mark (its filtering tokens were paid when
it was stored). Rows queued before it are unmarked, so their filtering asks for their
keyed charges as before; the way down drops the mark and keeps the rows.

Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from tests.support.db import DatabaseMixin

BEFORE = "0026_fts_automerge"  # the revision 0027_recipient_charged builds on


def thd_queue(conn: Connection, qid: str, address: str, charged: bool | None) -> None:
    """Blocking: a queued message with one recipient (`charged` None: as 0026 stored it)."""
    conn.execute(text("INSERT INTO queue_messages (id, kind, mail_from, size, body, created_at)"
                      " VALUES (:id, 'relay', 'x@y.test', 1, :body, 1.0)"),
                 {"id": qid, "body": b"x"})
    if charged is None:
        conn.execute(text("INSERT INTO queue_recipients (message_id, address, domain_id, state,"
                          " next_attempt_at, updated_at) VALUES (:id, :a, 1, 'queued', 1, 1)"),
                     {"id": qid, "a": address})
    else:
        conn.execute(text("INSERT INTO queue_recipients (message_id, address, domain_id, state,"
                          " next_attempt_at, updated_at, charged)"
                          " VALUES (:id, :a, 1, 'queued', 1, 1, :c)"),
                     {"id": qid, "a": address, "c": charged})


def thd_columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("queue_recipients")}


def thd_marks(conn: Connection) -> dict[str, bool]:
    rows = conn.execute(text("SELECT address, charged FROM queue_recipients"))
    return {row[0]: bool(row[1]) for row in rows}


def thd_addresses(conn: Connection) -> list[str]:
    rows = conn.execute(text("SELECT address FROM queue_recipients ORDER BY address"))
    return [row[0] for row in rows]


class RecipientChargedMigrationMixin(DatabaseMixin):
    async def at_0026(self) -> Database:
        return await self.open_database_before(BEFORE)

    async def test_recipients_queued_before_are_unmarked(self) -> None:
        db = await self.at_0026()
        self.assertNotIn("charged", await db.read("columns", thd_columns))
        await db.run("q", thd_queue, "Q1", "old@a.test", None)
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("marks", thd_marks), {"old@a.test": False})
        await db.run("q", thd_queue, "Q2", "new@a.test", True)
        self.assertEqual(await db.read("marks", thd_marks),
                         {"old@a.test": False, "new@a.test": True})

    async def test_downgrade_drops_the_mark_and_keeps_the_rows(self) -> None:
        db = await self.open_database()
        await db.run("q", thd_queue, "Q1", "p@a.test", True)
        await db.run("q", thd_queue, "Q2", "q@a.test", False)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("charged", await db.read("columns", thd_columns))
        self.assertEqual(await db.read("rows", thd_addresses), ["p@a.test", "q@a.test"])
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("marks", thd_marks), {"p@a.test": False,
                                                             "q@a.test": False})


class SQLiteRecipientChargedMigrationTests(RecipientChargedMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresRecipientChargedMigrationTests(RecipientChargedMigrationMixin, TestCase):
    backend = "postgresql"
