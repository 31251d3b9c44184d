"""Migration 0023 on a store holding mail: down to the FTS5 table with its own copy of the
text and back up to the external-content index, the same messages are found (SQLite), and
`search_extra` is refilled from the rows (both backends); PostgreSQL's full-text table gets
each message's user and date again (migration 0024)."""

from __future__ import annotations

from sqlalchemy import Connection, select
from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.messages import MessageQuery, MessageStore
from mailcore.store.migrate import downgrade_to
from mailcore.store.schema import messages
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user

_HTML = (b"Subject: Offer\r\nCc: Carol <carol@z.test>\r\nContent-Type: text/html\r\n\r\n"
         b"<p class=\"glorp\">Kumquat&amp;pie</p>\r\n")
_ATTACHED = (b"Subject: Scan\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
             b"--B\r\nContent-Type: text/plain\r\n\r\nsee file\r\n--B\r\n"
             b"Content-Type: application/pdf; name=\"zanzibar.pdf\"\r\n"
             b"Content-Disposition: attachment\r\n\r\n%PDF\r\n--B--\r\n")
_PLAIN = b"Subject: Walrus\r\nTo: Dora <dora@q.test>\r\n\r\nplain words\r\n"


class FtsMigrationMixin(DatabaseMixin):
    async def test_down_and_up_keep_every_message_findable(self) -> None:
        db = await self.open_database()
        user = await db.run("make_user", thd_make_user, "owner")
        store = MessageStore(db, CpuPool.for_tests(), Clock())
        ids = [await store.add_message(user, raw) for raw in (_HTML, _ATTACHED, _PLAIN)]

        def extras(conn: Connection) -> list[str]:
            return list(conn.execute(
                select(messages.c.search_extra).order_by(messages.c.id)).scalars())

        written = await db.read("extras", extras)
        self.assertEqual(written, ["Kumquat&pie", "zanzibar.pdf", ""])

        await threads.deferToThread(downgrade_to, db.engine, "0021_fetch_bulk")
        if self.backend == "sqlite":
            def old_match(conn: Connection, q: str) -> list[int]:
                return [r[0] for r in conn.exec_driver_sql(
                    "SELECT rowid FROM messages_fts WHERE messages_fts MATCH ? ORDER BY rowid",
                    (q,))]

            for q, want in [("kumquat", ids[:1]), ("carol", ids[:1]), ("zanzibar", ids[1:2]),
                            ("dora AND plain", ids[2:])]:
                self.assertEqual(await db.read("old_match", old_match, q), want, q)

        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("extras", extras), written)

        async def found(q: str) -> list[int]:
            page = await store.list_messages(user, MessageQuery(q=q, ordering="id"))
            return [m.id for m in page.items]

        for q, want in [("kumquat pie", ids[:1]), ("carol", ids[:1]), ("glorp", []),
                        ("zanzibar", ids[1:2]), ("dora plain", ids[2:])]:
            self.assertEqual(await found(q), want, q)
        if self.backend == "sqlite":
            def check(conn: Connection) -> None:
                conn.exec_driver_sql(
                    "INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")

            await db.run("fts_check", check)
        else:
            def copied(conn: Connection) -> list[tuple[object, ...]]:
                return [tuple(r) for r in conn.exec_driver_sql(
                    "SELECT s.message_row_id, s.user_id = m.user_id, s.date = m.date "
                    "FROM message_search s JOIN messages m ON m.id = s.message_row_id "
                    "ORDER BY 1")]

            self.assertEqual(await db.read("copied", copied),
                             [(row_id, True, True) for row_id in ids])


class SQLiteFtsMigrationTests(FtsMigrationMixin, TestCase):
    backend = "sqlite"


class PostgreSQLFtsMigrationTests(FtsMigrationMixin, TestCase):
    backend = "postgresql"
