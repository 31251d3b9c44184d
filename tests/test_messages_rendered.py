"""A list page written as JSON by the database (mailcore.messages.rendered), on SQLite and
on PostgreSQL: the same bytes as `email_json` of the page's rows, written by orjson; the
same keyset marks remembered; the usual page where it cannot be written that way (SQLite:
a time in another form) and for searches and the thread list.
"""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import Connection, update
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.messages import MessageQuery, MessageStore, MessageSummary, Page
from mailcore.messages.counts import CountCache
from mailcore.messages.keyset import PageMarks
from mailcore.messages.store import thd_list_messages
from mailcore.store.schema import messages
from mailcore.webhooks.payload import email_json
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user
from tests.test_messages_store import mail

# Text SQLite's JSON and orjson must escape alike: quotes, backslashes, every control
# character (NUL too where the database holds it: not PostgreSQL), DEL, line and paragraph
# separators, a BOM, accents and an emoji.
AWKWARD = ('"quoted" \\ back/slash ' + "".join(map(chr, range(1, 32))) + "\x7f\u2028\u2029"
           "\ufeff é 𝄞")

QUERIES = [
    MessageQuery(),
    MessageQuery(limit=3),
    MessageQuery(limit=3, offset=3),  # from the mark the page before left
    MessageQuery(limit=4, offset=8),  # past the middle: read from the other end
    MessageQuery(limit=5, offset=10),  # the last, short page
    MessageQuery(limit=1, offset=11),
    MessageQuery(ordering="date", limit=4, offset=1),
    MessageQuery(ordering="-subject", limit=5),
    MessageQuery(ordering="sender", limit=5, offset=6),
    MessageQuery(folder="Sent", limit=3),
    MessageQuery(folder="Sent", limit=3, offset=4),
    MessageQuery(has_attachments=True),
    MessageQuery(date_from=datetime.date(2024, 10, 3), date_to=datetime.date(2024, 10, 9),
                 ordering="date", limit=3, offset=2),
    MessageQuery(account_id=123, limit=3),  # nothing: no page to write
]


class _RenderedMixin(DatabaseMixin):
    async def store_awkward_mail(self) -> tuple[MessageStore, int]:
        """Twelve messages: a thread of three, odd text, a time with microseconds, one
        without a date, one with an attachment, one without a thread, INBOX and Sent."""
        self.db = await self.open_database()
        store = MessageStore(self.db, CpuPool.for_tests(), Clock())
        user = await self.db.run("make_user", thd_make_user, "owner")
        ids = []
        for n in range(1, 13):
            raw = mail(n, f"S{n:02d}", day=n, reply_to="<m1@x.test>" if n in (4, 7) else "")
            if n == 5:
                raw = (b"Subject: files\r\nFrom: a@x.test\r\nDate: 5 Oct 2024 12:00:00 +0000\r\n"
                       b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
                       b"Content-Type: text/plain\r\n\r\nsee file\r\n--B\r\n"
                       b"Content-Type: text/csv\r\nContent-Disposition: attachment; "
                       b"filename=\"d.csv\"\r\n\r\na,b\r\n--B--\r\n")
            ids.append(await store.add_message(
                user, raw, folder="Sent" if n % 3 == 0 else "INBOX"))

        nul = "\0" if self.backend == "sqlite" else ""

        def awkward(conn: Connection) -> None:
            change: list[tuple[int, dict[str, Any]]] = [
                (ids[1], {"subject": nul + AWKWARD, "sender": "Zoë <z@x.test>",
                          "recipient": ""}),
                (ids[2], {"date": datetime.datetime(2024, 10, 3, 9, 8, 7, 654321,
                                                    tzinfo=datetime.UTC)}),
                (ids[5], {"date": None}),
                (ids[8], {"thread_id": None}),
                (ids[9], {"date": datetime.datetime(2024, 10, 10, 0, 0, 0, 1,
                                                    tzinfo=datetime.UTC)}),
            ]
            for row_id, values in change:
                conn.execute(
                    update(messages).where(messages.c.id == row_id).values(**values))

        await self.db.run("awkward", awkward)
        return store, user

    async def both(self, user: int, query: MessageQuery) -> tuple[
            Page[MessageSummary], Page[MessageSummary], dict[Any, Any], dict[Any, Any]]:
        """The page read as rows and as JSON, each with marks of its own; and the marks."""
        rows_marks, json_marks = PageMarks(), PageMarks()
        pages: list[Page[MessageSummary]] = []
        for marks, as_json in ((rows_marks, False), (json_marks, True)):
            # The page before first, as a client paging through would have read it: its
            # marks are what a keyset page starts from.
            if query.offset:
                before = MessageQuery(**{**query.__dict__,
                                         "offset": max(query.offset - query.limit, 0)})
                await self.db.read("t", thd_list_messages, user, before, CountCache(),
                                   marks, None, as_json)
            pages.append(await self.db.read("t", thd_list_messages, user, query,
                                            CountCache(), marks, None, as_json))
        return pages[0], pages[1], dict(rows_marks._items), dict(json_marks._items)

    async def test_json_is_what_email_json_writes(self) -> None:
        from web.replies import encode_json

        _, user = await self.store_awkward_mail()
        for query in QUERIES:
            rows, written, rows_marks, json_marks = await self.both(user, query)
            with self.subTest(query=query):
                self.assertEqual(written.items, [])
                self.assertEqual((written.count, written.stamp), (rows.count, rows.stamp))
                if rows.items:
                    expected = encode_json([email_json(m) for m in rows.items])
                    self.assertEqual(written.json, expected)
                else:
                    self.assertIn(written.json, (None, b"[]"))
                self.assertEqual(json_marks, rows_marks)
        # The awkward values did come out (not all pages are of plain text).
        everything = (await self.both(user, MessageQuery()))[1].json
        self.assertIn(b'"thread_count":3', everything)
        self.assertIn(b'"has_attachments":true', everything)
        self.assertIn(b'"date":"2024-10-03T09:08:07.654321Z"', everything)
        self.assertIn(b'"date":"2024-10-10T00:00:00.000001Z"', everything)
        self.assertIn(b'"date":null', everything)
        self.assertIn(b'"thread_id":null', everything)
        self.assertIn(b'"recipient":""', everything)
        self.assertIn(b"\\u001f", everything)

    async def test_only_plain_lists_are_written(self) -> None:
        store, user = await self.store_awkward_mail()
        for query in (MessageQuery(q="S03"), MessageQuery(threads_only=True)):
            page = await store.list_messages(user, query, as_json=True)
            with self.subTest(query=query):
                self.assertIsNone(page.json)
                self.assertTrue(page.items)
        empty = await store.list_messages(user, MessageQuery(offset=50), as_json=True)
        self.assertEqual((empty.count, empty.items, empty.json), (12, [], None))


class SQLiteRenderedTests(_RenderedMixin, TestCase):
    backend = "sqlite"

    async def test_a_time_in_another_form_is_read_as_rows(self) -> None:
        _, user = await self.store_awkward_mail()
        # As SQLite's own datetime() writes it, not as the store does.
        await self.db.run("odd_time", lambda conn: conn.exec_driver_sql(
            "UPDATE messages SET date = '2024-10-20 12:00:00' WHERE subject = 'S12'"))
        rows, written, rows_marks, json_marks = await self.both(user, MessageQuery(limit=3))
        self.assertIsNone(written.json)
        self.assertEqual([m.id for m in written.items], [m.id for m in rows.items])
        self.assertEqual(json_marks, rows_marks)
        # The other pages are still written as JSON.
        self.assertIsNotNone((await self.both(user, MessageQuery(limit=3, offset=6)))[1].json)


class PostgreSQLRenderedTests(_RenderedMixin, TestCase):
    backend = "postgresql"
