"""Migration 0053: `mailboxes.quota_bytes`, one mailbox's own quota. The mailboxes a store
at 0051 holds get none (NULL: the configured quota), keep their usage, and the column goes on
the way down with every mailbox kept, on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user

BEFORE = "0052_file_nodes_rate_buckets"  # the revision 0053_mailbox_quota builds on


def thd_add_mailboxes(conn: Connection) -> None:
    """Blocking: two mailboxes as 0051 stores them, one with mail counted."""
    owner = thd_make_user(conn, "bob")
    conn.execute(text("INSERT INTO mailboxes (address, owner_id, created_at, used_bytes) "
                      "VALUES (:a, :o, 1.0, :u)"), [
        {"a": "bob@hosted.test", "o": owner, "u": 1234},
        {"a": "team@hosted.test", "o": owner, "u": 0}])


def thd_columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("mailboxes")}


class MailboxQuotaMigrationMixin(DatabaseMixin):
    timeout = 120

    async def at_0051_with_mailboxes(self) -> Database:
        db = await self.open_database_before(BEFORE)
        self.assertNotIn("quota_bytes", await db.read("columns", thd_columns))
        await db.run("mailboxes", thd_add_mailboxes)
        return db

    async def rows(self, db: Database, columns: str) -> list[tuple[Any, ...]]:
        rows = await db.read("rows", lambda c: c.execute(
            text(f"SELECT {columns} FROM mailboxes ORDER BY address")).all())
        return [tuple(r) for r in rows]

    async def test_every_mailbox_follows_the_configured_quota_on_the_way_up(self) -> None:
        db = await self.at_0051_with_mailboxes()
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await self.rows(db, "address, used_bytes, quota_bytes"),
                         [("bob@hosted.test", 1234, None), ("team@hosted.test", 0, None)])
        await db.run("own", lambda c: c.execute(text(
            "UPDATE mailboxes SET quota_bytes = 5000000000 WHERE address = 'team@hosted.test'")))
        self.assertEqual(await self.rows(db, "quota_bytes"), [(None,), (5_000_000_000,)])

    async def test_the_column_goes_on_the_way_down(self) -> None:
        db = await self.at_0051_with_mailboxes()
        await threads.deferToThread(db.migrate_blocking)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("quota_bytes", await db.read("columns", thd_columns))
        self.assertEqual(await self.rows(db, "address, used_bytes"),
                         [("bob@hosted.test", 1234), ("team@hosted.test", 0)])


class SQLiteMailboxQuotaMigrationTests(MailboxQuotaMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresMailboxQuotaMigrationTests(MailboxQuotaMigrationMixin, TestCase):
    backend = "postgresql"
