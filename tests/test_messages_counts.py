"""The counts the database keeps for the message reads (migration 0020) and the reads that
use them: they always equal counting the rows, through inserts, thread merges, folder moves,
deletes and account deletion; deep pages read from the other end equal pages read forward.

Every test runs on SQLite and on PostgreSQL through tests.support.db.
"""

from __future__ import annotations

import datetime

import orjson
from sqlalchemy import Connection, case, delete, func, select, update
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.messages import FetchedMessage, Location, MessageQuery, MessageStore
from mailcore.messages.counts import (
    thd_change_stamp,
    thd_folder_totals,
    thd_message_total,
    thd_thread_total,
)
from mailcore.messages.keyset import PageMarks
from mailcore.messages.sql import new_id
from mailcore.messages.store import thd_list_messages
from mailcore.messages.threading import thd_drop_empty_threads
from mailcore.store.schema import fetch_accounts, messages, threads
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user
from tests.test_messages_store import mail


def thd_make_account(conn: Connection, user: int) -> int:
    now = datetime.datetime.now(datetime.UTC)
    return new_id(conn.execute(fetch_accounts.insert().values(
        user_id=user, host="h", port=1, username="u", password_enc=b"x", created_at=now,
        updated_at=now,
    )))


def thd_live(conn: Connection, user: int, account: int | None) -> tuple[dict[str, int], int]:
    """Messages per folder and threads, counted from the rows."""
    conds = [messages.c.user_id == user]
    if account is not None:
        conds.append(messages.c.account_id == account)
    folders = {f: int(n) for f, n in conn.execute(
        select(messages.c.folder, func.count()).where(*conds).group_by(messages.c.folder))}
    threads_n = conn.execute(select(func.count(func.distinct(
        case((messages.c.thread_id.is_(None), -messages.c.id), else_=messages.c.thread_id)
    ))).where(*conds)).scalar()
    return folders, int(threads_n or 0)


def thd_kept(conn: Connection, user: int, account: int | None) -> tuple[dict[str, int],
                                                                       int | None]:
    return thd_folder_totals(conn, user, account), thd_thread_total(conn, user, account)


class CountsTestsMixin(DatabaseMixin):
    async def setUp(self) -> None:  # type: ignore[override]
        self.db = await self.open_database()
        self.user = await self.db.run("make_user", thd_make_user, "owner")
        self.store = MessageStore(self.db, CpuPool.for_tests(), Clock())

    async def assertCountsTrue(self, *accounts: int | None) -> None:
        for account in (None, *accounts):
            live = await self.db.read("live", thd_live, self.user, account)
            kept = await self.db.read("kept", thd_kept, self.user, account)
            if kept[1] is None:  # one account among several: the reads count the rows
                kept = (kept[0], live[1])
            self.assertEqual(kept, live, f"account {account}")
            stats = await self.store.statistics(self.user, account)
            self.assertEqual((stats.folders, stats.total_emails, stats.total_threads),
                             (live[0], sum(live[0].values()), live[1]))

    async def add(self, n: int, subject: str, account: int | None, folder: str,
                  **kw: object) -> int:
        result = await self.store.store_batch(
            Location(self.user, account, None, folder),
            [FetchedMessage(raw=mail(n, subject, **kw))],  # type: ignore[arg-type]
        )
        return result.created[0]

    async def test_counts_follow_inserts_merges_moves_and_deletes(self) -> None:
        a1 = await self.db.run("acct", thd_make_account, self.user)
        a2 = await self.db.run("acct", thd_make_account, self.user)
        stamp0 = await self.db.read("stamp", thd_change_stamp, self.user)
        # A reply first, then an unrelated message, then the root: two threads merge.
        await self.add(3, "Re: Re: Plan", a1, "INBOX", refs="<m1@x.test> <m2@x.test>",
                       reply_to="<m2@x.test>", day=3)
        await self.add(9, "Other", a2, "INBOX", day=2)
        await self.add(4, "Side note", a2, "Sent", reply_to="<m2@x.test>", day=4)
        await self.add(1, "Plan", a1, "Archive", day=1)
        await self.add(2, "Re: Plan", a1, "INBOX", refs="<m1@x.test>",
                       reply_to="<m1@x.test>", day=2)
        await self.add(5, "Local", None, "INBOX", day=5)
        await self.assertCountsTrue(a1, a2)
        stamp1 = await self.db.read("stamp", thd_change_stamp, self.user)
        self.assertGreater(stamp1, stamp0)

        def move(conn: Connection) -> None:
            conn.execute(update(messages).where(messages.c.folder == "Sent")
                         .values(folder="Archive"))

        await self.db.run("move", move)
        await self.assertCountsTrue(a1, a2)
        self.assertGreater(await self.db.read("stamp", thd_change_stamp, self.user), stamp1)

        def drop_thread(conn: Connection) -> None:
            # A thread row deleted under its messages: they become threadless (SET NULL).
            tid = conn.execute(select(messages.c.thread_id).where(
                messages.c.subject == "Local")).scalar()
            conn.execute(delete(threads).where(threads.c.id == tid))

        await self.db.run("drop_thread", drop_thread)
        await self.assertCountsTrue(a1, a2)

        def drop_account(conn: Connection) -> None:
            conn.execute(delete(fetch_accounts).where(fetch_accounts.c.id == a1))
            thd_drop_empty_threads(conn, self.user)

        await self.db.run("drop_account", drop_account)
        await self.assertCountsTrue(a2)
        self.assertEqual(await self.store.folder_names(self.user), ["Archive", "INBOX"])
        self.assertEqual(await self.store.folder_names(self.user, a2), ["Archive", "INBOX"])
        self.assertEqual(await self.db.read("total", thd_message_total, self.user, a1), 0)

    async def test_deep_pages_equal_pages_read_forward(self) -> None:
        for n in range(1, 24):
            # Equal dates in pairs: the row id breaks the ties.
            await self.add(n, f"S{n % 5}", None, "INBOX" if n % 3 else "Sent", day=1 + n // 2)
        for ordering in ("-date", "date", "subject", "-subject,date", "id"):
            for folder in (None, "Sent"):
                full = await self.store.list_messages(self.user, MessageQuery(
                    ordering=ordering, folder=folder, limit=100))
                expected = [m.id for m in full.items]
                got: list[int] = []
                for offset in range(0, len(expected), 4):
                    page = await self.store.list_messages(self.user, MessageQuery(
                        ordering=ordering, folder=folder, offset=offset, limit=4))
                    self.assertEqual(page.count, len(expected))
                    got += [m.id for m in page.items]
                self.assertEqual(got, expected, (ordering, folder))
                # Read again, backwards: pages start from the rows the first pass remembered.
                again: list[int] = []
                for offset in reversed(range(0, len(expected), 4)):
                    page = await self.store.list_messages(self.user, MessageQuery(
                        ordering=ordering, folder=folder, offset=offset, limit=4))
                    again = [m.id for m in page.items] + again
                self.assertEqual(again, expected, (ordering, folder))
                past = await self.store.list_messages(self.user, MessageQuery(
                    ordering=ordering, folder=folder, offset=len(expected), limit=4))
                self.assertEqual(past.items, [])

    async def test_a_first_page_equals_the_page_read_in_two_steps(self) -> None:
        """A first page of a list filtered by account and folder only (on PostgreSQL one
        statement with the count and the stamp) is the page, count and stamp read the
        general way (count and stamp first, then the rows), for every such filter, an
        empty list and a page longer than the list included."""
        a1 = await self.db.run("acct", thd_make_account, self.user)
        a2 = await self.db.run("acct", thd_make_account, self.user)
        empty = await self.db.run("acct", thd_make_account, self.user)
        await self.add(1, "Plan", a1, "INBOX", day=3)
        await self.add(2, "Re: Plan", a1, "Sent", refs="<m1@x.test>", reply_to="<m1@x.test>",
                       day=3)
        await self.add(3, "Other", a2, "INBOX", day=1)
        await self.add(4, "Local", None, "INBOX", day=2)
        for ordering in ("-date", "date"):
            for account in (None, a1, a2, empty):
                for folder in (None, "INBOX", "Sent", "Nope"):
                    for limit in (1, 50):
                        query = MessageQuery(ordering=ordering, account_id=account,
                                             folder=folder, limit=limit)
                        one = await self.store.list_messages(self.user, query)
                        # Asked with a stamp no page has: the count and stamp come first.
                        two = await self.db.read("two", thd_list_messages, self.user, query,
                                                 None, PageMarks(), -1)
                        self.assertEqual(one.items, two.items, (ordering, account, folder))
                        self.assertEqual((one.count, one.stamp, one.unchanged),
                                         (two.count, two.stamp, False))
                        self.assertIsNotNone(one.stamp)
        none = await self.db.run("make_user", thd_make_user, "nobody")
        page = await self.store.list_messages(none, MessageQuery())
        self.assertEqual((page.items, page.count), ([], 0))

    async def test_a_later_page_read_in_one_statement_equals_the_page_read_in_two(
            self) -> None:
        """A page after the first, read knowing the list's last stamp and count (one
        statement with the count and the stamp, planned from them: forward, from a
        remembered row or from the other end), is the page the general way reads, as rows
        and as JSON; when the list changed since, it is read again and is still right."""
        from mailcore.messages import store as store_module

        for n in range(1, 15):
            await self.add(n, f"S{n}", None, "INBOX" if n % 3 else "Sent", day=1 + n // 2)
        marks = {as_json: PageMarks() for as_json in (False, True)}

        async def check(query: MessageQuery) -> None:
            two = await self.db.read("two", thd_list_messages, self.user, query, None,
                                     PageMarks(), -1)
            for as_json, kept in marks.items():
                one = await self.db.read("one", thd_list_messages, self.user, query, None,
                                         kept, None, as_json)
                self.assertEqual((one.count, one.stamp), (two.count, two.stamp), query)
                if as_json and one.json is not None:
                    self.assertEqual([e["id"] for e in orjson.loads(one.json)],
                                     [m.id for m in two.items], query)
                else:
                    self.assertEqual(one.items, two.items, query)

        for ordering in ("-date", "date"):
            for folder in (None, "Sent"):
                for offset in (0, 3, 6, 9, 12, 9, 3, 13, 20):  # forward, back, past the end
                    await check(MessageQuery(ordering=ordering, folder=folder,
                                             offset=offset, limit=3))
        # Known stamp and count: no separate read of them.
        real = store_module.thd_total_stamp_and_pop

        def refused(*args: object) -> object:
            raise AssertionError("the count and stamp were read apart")

        deep = MessageQuery(offset=6, limit=3)
        expected = await self.db.read("two", thd_list_messages, self.user, deep, None,
                                      PageMarks(), -1)
        store_module.thd_total_stamp_and_pop = refused  # type: ignore[assignment]
        try:
            # (As JSON: on SQLite only a page written as JSON comes with its count.)
            page = await self.db.read("one", thd_list_messages, self.user, deep, None,
                                      marks[True], None, True)
        finally:
            store_module.thd_total_stamp_and_pop = real  # type: ignore[assignment]
        self.assertEqual(([e["id"] for e in orjson.loads(page.json or b"")], page.count),
                         ([m.id for m in expected.items], expected.count))
        # The list changes: the planned page is not kept, the page is read again.
        await self.add(30, "S30", None, "INBOX", day=30)
        for offset in (6, 12, 3):
            await check(MessageQuery(offset=offset, limit=3))

    async def test_remembered_page_starts_are_forgotten_when_messages_change(self) -> None:
        for n in range(1, 13):
            await self.add(n, f"S{n}", None, "INBOX", day=n)
        deep = MessageQuery(offset=4, limit=2)
        for _ in range(2):  # the second read starts from the remembered row
            page = await self.store.list_messages(self.user, deep)
            self.assertEqual([m.subject for m in page.items], ["S8", "S7"])
        await self.add(20, "S20", None, "INBOX", day=20)
        page = await self.store.list_messages(self.user, deep)
        self.assertEqual([m.subject for m in page.items], ["S9", "S8"])

    async def test_thread_list_shows_the_first_matching_message_of_each_thread(self) -> None:
        """As seed 001's example and its reference show a thread (e36e555): by its first
        message among those the filters keep, placed by that message's date."""
        root = await self.add(1, "Plan", None, "INBOX", day=1)
        reply = await self.add(2, "Re: Plan", None, "Sent", reply_to="<m1@x.test>", day=5)
        alone = await self.add(3, "Alone", None, "INBOX", day=3)
        page = await self.store.list_threads(self.user, MessageQuery())
        self.assertEqual([(m.id, m.thread_count) for m in page.items],
                         [(alone, 1), (root, 2)])
        self.assertEqual(page.count, 2)
        inbox = await self.store.list_threads(self.user, MessageQuery(folder="INBOX"))
        self.assertEqual([m.id for m in inbox.items], [alone, root])
        self.assertEqual(inbox.count, 2)
        sent = await self.store.list_threads(self.user, MessageQuery(folder="Sent"))
        self.assertEqual([m.id for m in sent.items], [reply])
        oldest_first = await self.store.list_threads(self.user, MessageQuery(ordering="date",
                                                                             offset=1))
        self.assertEqual([m.id for m in oldest_first.items], [alone])

    async def test_search_count_is_remembered_until_the_users_messages_change(self) -> None:
        await self.add(1, "Budget plan", None, "INBOX", day=1)
        await self.add(2, "Other", None, "INBOX", day=2)
        page = await self.store.list_messages(self.user, MessageQuery(q="budget", limit=1))
        self.assertEqual(page.count, 1)
        self.assertEqual(len(self.store.count_cache._items), 1)
        # A stale entry would answer 1: the new message moves the stamp.
        await self.add(3, "Budget again", None, "Sent", day=3)
        page = await self.store.list_messages(self.user, MessageQuery(q="budget", limit=1))
        self.assertEqual(page.count, 2)

        def move(conn: Connection) -> None:
            conn.execute(update(messages).where(messages.c.folder == "Sent")
                         .values(folder="INBOX"))

        inbox = MessageQuery(q="budget", folder="INBOX")
        self.assertEqual((await self.store.list_messages(self.user, inbox)).count, 1)
        await self.db.run("move", move)
        self.assertEqual((await self.store.list_messages(self.user, inbox)).count, 2)

    async def test_lists_by_attachments_are_kept_with_the_stamp(self) -> None:
        """A list of the messages with (or without) attachments is counted once while the
        user's stamp stands, and its deep pages start from remembered rows, kept apart
        from the same list unfiltered; a store or a delete changes both."""
        def files(n: int, day: int) -> bytes:
            return (f"Message-ID: <f{n}@x.test>\r\nSubject: F{n}\r\nFrom: a@x.test\r\n"
                    f"Date: {day} Oct 2024 12:00:00 +0000\r\nContent-Type: multipart/mixed; "
                    "boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nsee file\r\n"
                    "--B\r\nContent-Type: text/csv\r\nContent-Disposition: attachment; "
                    'filename="d.csv"\r\n\r\na,b\r\n--B--\r\n').encode()

        async def add_files(n: int, day: int) -> int:
            result = await self.store.store_batch(Location(self.user, None, None, "INBOX"),
                                                  [FetchedMessage(raw=files(n, day))])
            return result.created[0]

        with_files = [await add_files(n, day=n) for n in range(1, 9)]
        plain = [await self.add(n, f"S{n}", None, "INBOX", day=n) for n in range(11, 15)]
        newest = sorted(with_files, reverse=True)
        queries = {True: MessageQuery(has_attachments=True, offset=4, limit=2),
                   False: MessageQuery(has_attachments=False, offset=2, limit=2),
                   None: MessageQuery(offset=4, limit=2)}
        expected = {True: newest[4:6], False: sorted(plain, reverse=True)[2:4],
                    None: newest[:2]}
        for _ in range(2):  # the second read: the count kept, the page from a mark
            for flag, query in queries.items():
                page = await self.store.list_messages(self.user, query)
                self.assertEqual([m.id for m in page.items], expected[flag], flag)
                self.assertEqual(page.count, {True: 8, False: 4, None: 12}[flag])
                self.assertIsNotNone(page.stamp)
        # Each count is kept with the stamp (and by the filter: True, False, None apart).
        stamp = await self.db.read("stamp", thd_change_stamp, self.user)
        for flag in (True, False):
            key = (self.user, None, None, None, None, None, flag, False)
            self.assertEqual(self.store.count_cache.peek(key),
                             (stamp, {True: 8, False: 4}[flag]), flag)
        page = await self.store.list_messages(self.user, MessageQuery(
            has_attachments=True, limit=2))
        self.assertEqual((page.count, [m.id for m in page.items]), (8, newest[:2]))
        # A store and a delete move the stamp: counts and pages follow.
        late = await add_files(20, day=20)
        page = await self.store.list_messages(self.user, queries[True])
        self.assertEqual((page.count, [m.id for m in page.items]), (9, newest[3:5]))
        await self.db.run("delete", lambda conn: conn.execute(
            delete(messages).where(messages.c.id.in_([late, newest[0]]))))
        page = await self.store.list_messages(self.user, queries[True])
        self.assertEqual((page.count, [m.id for m in page.items]), (7, newest[5:7]))

    async def test_message_with_thread_in_one_read(self) -> None:
        root = await self.add(1, "Plan", None, "INBOX", day=1)
        reply = await self.add(2, "Re: Plan", None, "INBOX", reply_to="<m1@x.test>", day=2)
        detail, thread = await self.store.message_and_thread(self.user, reply)
        self.assertEqual(detail.summary.id, reply)
        self.assertEqual(thread, [root, reply])
        self.assertEqual(detail.summary.thread_count, 2)
        self.assertEqual([d.summary.id async for d in self.store.details_of(
            self.user, [reply, 10**9, root])], [reply, root])


class SQLiteCountsTests(CountsTestsMixin, TestCase):
    backend = "sqlite"


class PostgreSQLCountsTests(CountsTestsMixin, TestCase):
    backend = "postgresql"

    async def test_list_pages_run_on_a_kept_generic_plan(self) -> None:
        """A first page and a page from a remembered row, read again and again, are not
        planned again each time: their statements (LIMIT and OFFSET written in) are
        prepared once on the connection and PostgreSQL keeps their generic plan."""
        for n in range(1, 13):
            await self.add(n, f"S{n}", None, "INBOX", day=n)
        marks = PageMarks()
        queries = [MessageQuery(limit=3), MessageQuery(offset=3, limit=3)]

        def read_often(conn: Connection) -> list[tuple[str, int, int]]:
            # psycopg prepares a statement at its fifth run; PostgreSQL plans the first
            # five runs of a prepared statement for their parameters, then weighs its
            # generic plan.
            for _ in range(20):
                for query in queries:
                    for as_json in (False, True):
                        page = thd_list_messages(conn, self.user, query, None, marks, None,
                                                 as_json)
                        self.assertEqual(page.count, 12)
            return [(r[0], int(r[1]), int(r[2])) for r in conn.exec_driver_sql(
                "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement LIKE '%%LIMIT 3%%'")]

        found = await self.db.read("often", read_often)
        # The first page and the later one, each as rows and as JSON.
        self.assertEqual(len(found), 4, found)
        for statement, generic, custom in found:
            self.assertGreater(generic, custom, statement[-200:])
