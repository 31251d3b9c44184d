"""Migration 0049: `mailapi_mail.size` and `mailboxes.used_bytes`, counted from the rows a
store at 0048 holds: a mail's text fields in UTF-8 octets, its attachments and its message
as sent (`raw`); a mailbox's bytes are its mail's. Both columns go on the way down. SQLite
and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user

BEFORE = "0048_fetch_folder_skipped"  # the revision 0049_mailapi_usage builds on


def thd_add_mail(conn: Connection) -> None:
    """Blocking: two mailboxes as 0048 stores them, one with a draft (an attachment, a
    subject that is not ASCII) and sent mail, the other empty."""
    owner = thd_make_user(conn, "bob")
    for box_id, address in ((1, "bob@hosted.test"), (2, "empty@hosted.test")):
        conn.execute(text("INSERT INTO mailboxes (id, address, owner_id, created_at) "
                          "VALUES (:id, :a, :o, 1.0)"), {"id": box_id, "a": address, "o": owner})
    conn.execute(text(
        "INSERT INTO mailapi_mail (id, public_id, mailbox_id, status, mail_from, subject, "
        "body, raw, created_at) VALUES (:id, :p, 1, :s, 'bob@hosted.test', :subj, :body, "
        ":raw, 1.0)"), [
            {"id": 1, "p": "a1", "s": "draft", "subj": "héllo", "body": "x" * 10, "raw": None},
            {"id": 2, "p": "a2", "s": "sent", "subj": "", "body": "", "raw": b"r" * 300}])
    conn.execute(text(
        "INSERT INTO mailapi_attachments (mail_id, name, content_type, size, sha256) "
        "VALUES (1, 'a', 'b', 1000, 'f'), (1, 'c', 'd', 24, 'e')"))


def thd_columns(conn: Connection, table: str) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns(table)}


class MailApiUsageMigrationMixin(DatabaseMixin):
    timeout = 120

    async def at_0048_with_mail(self) -> Database:
        db = await self.open_database_before(BEFORE)
        self.assertNotIn("size", await db.read("columns", thd_columns, "mailapi_mail"))
        await db.run("mail", thd_add_mail)
        return db

    async def test_sizes_and_usage_are_counted_on_the_way_up(self) -> None:
        db = await self.at_0048_with_mail()
        await threads.deferToThread(db.migrate_blocking)
        sizes = await db.read("sizes", lambda c: [tuple(r) for r in c.execute(
            text("SELECT id, size FROM mailapi_mail ORDER BY id"))])
        fields = len("bob@hosted.test")
        self.assertEqual(sizes, [(1, fields + len("héllo".encode()) + 10 + 1024),
                                 (2, fields + 300)])
        used = await db.read("used", lambda c: [tuple(r) for r in c.execute(
            text("SELECT id, used_bytes FROM mailboxes ORDER BY id"))])
        self.assertEqual(used, [(1, sizes[0][1] + sizes[1][1]), (2, 0)])

    async def test_the_columns_go_on_the_way_down(self) -> None:
        db = await self.at_0048_with_mail()
        await threads.deferToThread(db.migrate_blocking)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("size", await db.read("columns", thd_columns, "mailapi_mail"))
        self.assertNotIn("used_bytes", await db.read("columns", thd_columns, "mailboxes"))
        self.assertEqual(len(await db.read("rows", lambda c: c.execute(
            text("SELECT id FROM mailapi_mail")).all())), 2)


class SQLiteMailApiUsageMigrationTests(MailApiUsageMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresMailApiUsageMigrationTests(MailApiUsageMigrationMixin, TestCase):
    backend = "postgresql"
