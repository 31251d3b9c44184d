"""Migration 0026: SQLite's full-text index merges its segments 16 at a time (FTS5's default
is 4), a setting kept in the store; a downgrade gives the default back; the index still
finds what is stored before and after."""

from __future__ import annotations

from sqlalchemy import Connection
from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.messages import MessageQuery, MessageStore
from mailcore.store.migrate import downgrade_to
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user

BEFORE = "0025_message_columns"


def _automerge(conn: Connection) -> int | None:
    """The index's automerge setting; None while it is FTS5's default (not stored)."""
    value = conn.exec_driver_sql(
        "SELECT v FROM messages_fts_config WHERE k = 'automerge'").scalar()
    return None if value is None else int(value)


class SQLiteAutomergeTests(DatabaseMixin, TestCase):
    backend = "sqlite"

    async def test_the_index_merges_sixteen_segments_at_a_time(self) -> None:
        db = await self.open_database()
        self.assertEqual(await db.read("automerge", _automerge), 16)
        user = await db.run("make_user", thd_make_user, "owner")
        store = MessageStore(db, CpuPool.for_tests(), Clock())
        first = await store.add_message(user, b"Subject: Quokka\r\n\r\nmarsupial\r\n")

        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertEqual(await db.read("automerge", _automerge), 4)
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("automerge", _automerge), 16)

        second = await store.add_message(user, b"Subject: Wallaby\r\n\r\nmarsupial\r\n")
        page = await store.list_messages(user, MessageQuery(q="marsupial", ordering="id"))
        self.assertEqual([m.id for m in page.items], [first, second])

        def integrity(conn: Connection) -> None:
            conn.exec_driver_sql(
                "INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")

        await db.run("integrity", integrity)


class PostgreSQLAutomergeTests(DatabaseMixin, TestCase):
    backend = "postgresql"

    async def test_nothing_changes(self) -> None:
        db = await self.open_database()
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        await threads.deferToThread(db.migrate_blocking)
        user = await db.run("make_user", thd_make_user, "owner")
        store = MessageStore(db, CpuPool.for_tests(), Clock())
        found = await store.add_message(user, b"Subject: Quokka\r\n\r\nmarsupial\r\n")
        page = await store.list_messages(user, MessageQuery(q="marsupial"))
        self.assertEqual([m.id for m in page.items], [found])
