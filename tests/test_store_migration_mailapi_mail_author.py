"""Migration 0050: `mailapi_mail.author_id`, the user who put a mail in the outbox. Mail
stored at 0049 keeps no author (it is sent as before); the column goes on the way down and
the mail stays. SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user

BEFORE = "0049_mailapi_usage"  # the revision 0050_mailapi_mail_author builds on


def thd_add_mail(conn: Connection) -> None:
    owner = thd_make_user(conn, "bob")
    conn.execute(text("INSERT INTO mailboxes (id, address, owner_id, created_at) "
                      "VALUES (1, 'bob@hosted.test', :o, 1.0)"), {"o": owner})
    conn.execute(text("INSERT INTO mailapi_mail (public_id, mailbox_id, status, raw, "
                      "queue_id, outbox_seq, created_at) VALUES ('a1', 1, 'outbox', :raw, "
                      "'Q1', 1, 1.0)"), {"raw": b"x"})


def thd_columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("mailapi_mail")}


class MailAuthorMigrationMixin(DatabaseMixin):
    timeout = 120

    async def at_0049_with_mail(self) -> Database:
        db = await self.open_database_before(BEFORE)
        self.assertNotIn("author_id", await db.read("columns", thd_columns))
        await db.run("mail", thd_add_mail)
        return db

    async def test_mail_keeps_no_author_on_the_way_up(self) -> None:
        db = await self.at_0049_with_mail()
        await threads.deferToThread(db.migrate_blocking)
        rows = await db.read("rows", lambda c: [tuple(r) for r in c.execute(
            text("SELECT public_id, status, author_id FROM mailapi_mail"))])
        self.assertEqual(rows, [("a1", "outbox", None)])

    async def test_the_column_goes_on_the_way_down(self) -> None:
        db = await self.at_0049_with_mail()
        await threads.deferToThread(db.migrate_blocking)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("author_id", await db.read("columns", thd_columns))
        self.assertEqual(len(await db.read("rows", lambda c: c.execute(
            text("SELECT id FROM mailapi_mail")).all())), 1)


class SQLiteMailAuthorMigrationTests(MailAuthorMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresMailAuthorMigrationTests(MailAuthorMigrationMixin, TestCase):
    backend = "postgresql"
