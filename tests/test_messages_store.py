"""The message store: dedup by hash, threads, full-text search, filters, ordering, pages.

Every test runs on SQLite (FTS5) and on PostgreSQL (tsvector) through tests.support.db.
Raw bytes are also read in slices (substr in SQL) for messages too large to hold whole.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import random
from typing import Any
from urllib.parse import quote

from sqlalchemy import Connection, event, func, select
from sqlalchemy.dialects import postgresql
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.fetch.state import thd_created_since, thd_mark_gone
from mailcore.messages import (
    FetchedMessage,
    Location,
    MessageNotFound,
    MessageQuery,
    MessageStore,
    QueryError,
)
from mailcore.messages.parse import MAX_INDEXED_BYTES
from mailcore.messages.sql import new_id
from mailcore.messages.store import (
    RAW_CHUNK,
    _json_rows,
    _plain_page,
    raw_chunks,
    thd_list_messages,
    thd_put_blobs,
    thd_raw_slice,
)
from mailcore.store.prepared import Prepared
from mailcore.store.schema import fetch_accounts, message_blobs, messages, threads
from mailcore.workers import CpuPool
from tests.support.db import (
    DatabaseMixin,
    driver_query_plans,
    engine_query_plans,
    full_scans,
    query_plans,
)
from tests.support.fetchenv import thd_make_user, thread_of


def mail(n: int, subject: str, *, body: str = "", refs: str = "", reply_to: str = "",
         sender: str = "alice@x.test", to: str = "bob@y.test", day: int = 1,
         msgid: str | None = None, extra: str = "") -> bytes:
    headers = [
        f"Message-ID: {msgid or f'<m{n}@x.test>'}",
        f"Subject: {subject}",
        f"From: {sender}",
        f"To: {to}",
        f"Date: {day} Oct 2024 12:00:00 +0000",
        "Content-Type: text/plain; charset=utf-8",
    ]
    if refs:
        headers.append(f"References: {refs}")
    if reply_to:
        headers.append(f"In-Reply-To: {reply_to}")
    if extra:
        headers.append(extra)
    return ("\r\n".join(headers) + "\r\n\r\n" + (body or f"body {n}") + "\r\n").encode()


def _make_folder(conn: Connection, user: int) -> int:
    """An account of `user` with an INBOX folder; the folder's id."""
    from mailcore.fetch.state import thd_folder

    account = new_id(conn.execute(fetch_accounts.insert().values(
        user_id=user, host="h", port=1, username="u", password_enc=b"x",
        created_at=datetime.datetime.now(datetime.UTC),
        updated_at=datetime.datetime.now(datetime.UTC),
    )))
    return thd_folder(conn, account, "INBOX").id


def _accounts_with_folders(conn: Connection, user: int, n: int) -> list[tuple[int, int]]:
    """`n` accounts of `user`, each with an INBOX: (account id, folder id) of each."""
    from mailcore.fetch.state import thd_folder

    now = datetime.datetime.now(datetime.UTC)
    made = []
    for _ in range(n):
        account = new_id(conn.execute(fetch_accounts.insert().values(
            user_id=user, host="h", port=1, username="u", password_enc=b"x",
            created_at=now, updated_at=now)))
        made.append((account, thd_folder(conn, account, "INBOX").id))
    return made


class StoreTestsMixin(DatabaseMixin):
    async def make_store(self) -> tuple[MessageStore, int]:
        db = await self.open_database()
        self.db = db
        user = await db.run("make_user", thd_make_user, "owner")
        return MessageStore(db, CpuPool.for_tests(), Clock()), user

    async def scalar(self, fn: object) -> int:
        return int(await self.db.read("test_scalar", fn))  # type: ignore[arg-type]

    async def test_same_bytes_stored_once_and_batches_are_idempotent(self) -> None:
        store, user = await self.make_store()
        raw = mail(1, "Hello")
        inbox = Location(user, None, None, "INBOX")
        a = await store.add_message(user, raw)
        b = await store.add_message(user, raw, folder="Archive")
        self.assertNotEqual(a, b)

        def blobs(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).select_from(message_blobs)).scalar()
                       or 0)

        self.assertEqual(await self.scalar(blobs), 1)
        self.assertEqual(await store.raw_message(user, b), raw)
        # Both copies are one conversation.
        self.assertEqual((await store.get_message(user, a)).summary.thread_id,
                         (await store.get_message(user, b)).summary.thread_id)
        self.assertIsNotNone(inbox)

    async def test_refetched_uid_is_not_stored_twice(self) -> None:
        store, user = await self.make_store()

        folder_id = await self.db.run("make_folder", _make_folder, user)
        where = Location(user, None, folder_id, "INBOX", uidvalidity=7)
        batch = [FetchedMessage(raw=mail(i, f"s{i}"), uid=i) for i in range(1, 4)]
        first = await store.store_batch(where, batch)
        second = await store.store_batch(where, batch)
        self.assertEqual((len(first.created), first.already_stored), (3, 0))
        self.assertEqual((len(second.created), second.already_stored), (0, 3))

    async def test_bytes_put_back_under_a_new_uid_are_our_copy_again(self) -> None:
        """A message expunged at the server stays in the backup, marked gone; put back (a
        restore appends it) it came back under a new UID as a second row, so the backup
        counted it twice and a migrate copied it twice (found by an audit). The gone row
        takes the new UID; bytes the folder holds on the server already are a new row."""
        store, user = await self.make_store()
        folder_id = await self.db.run("make_folder", _make_folder, user)
        where = Location(user, None, folder_id, "INBOX", uidvalidity=7)
        twin = mail(1, "same")
        first = await store.store_batch(where, [
            FetchedMessage(raw=twin, uid=1), FetchedMessage(raw=twin, uid=2),
            FetchedMessage(raw=mail(3, "kept"), uid=3)])
        await self.db.run("gone", thd_mark_gone, folder_id, 7, [1, 2])
        back = await store.store_batch(where, [
            FetchedMessage(raw=twin, uid=10, flags=("\\Seen",)),
            FetchedMessage(raw=mail(3, "kept"), uid=11)])
        self.assertEqual((back.relinked, len(back.created)), (1, 1))

        def rows(conn: Connection) -> list[tuple[int, int, bool, str]]:
            return [(r.id, r.uid, bool(r.on_server), r.flags) for r in conn.execute(
                select(messages.c.id, messages.c.uid, messages.c.on_server, messages.c.flags)
                .order_by(messages.c.id))]

        self.assertEqual(await self.db.read("rows", rows), [
            (first.created[0], 10, True, "\\Seen"), (first.created[1], 2, False, ""),
            (first.created[2], 3, True, ""), (back.created[0], 11, True, "")])

    async def test_threads_by_references_out_of_order_and_merge(self) -> None:
        store, user = await self.make_store()
        # The reply to a reply arrives first; it names the root and the missing middle one.
        c = await store.add_message(user, mail(3, "Re: Re: Plan", refs="<m1@x.test> <m2@x.test>",
                                               reply_to="<m2@x.test>", day=3))
        unrelated = await store.add_message(user, mail(9, "Other", day=2))
        a = await store.add_message(user, mail(1, "Plan", day=1))
        # A separate conversation that later turns out to be the same one.
        d = await store.add_message(user, mail(4, "Side note", reply_to="<m2@x.test>", day=4))
        b = await store.add_message(user, mail(2, "Re: Plan", refs="<m1@x.test>",
                                               reply_to="<m1@x.test>", day=2))
        thread = await thread_of(store, user, a)
        self.assertEqual([m.summary.id for m in thread], [a, b, c, d])
        self.assertEqual({m.summary.thread_count for m in thread}, {4})
        self.assertEqual(len(await thread_of(store, user, unrelated)), 1)

        def thread_rows(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).select_from(threads)).scalar() or 0)

        self.assertEqual(await self.scalar(thread_rows), 2)
        stats = await store.statistics(user)
        self.assertEqual((stats.total_emails, stats.total_threads), (5, 2))

    async def test_one_batch_threads_as_one_message_at_a_time(self) -> None:
        # Links inside the batch (a reply before its parent, two conversations one message
        # joins, a subject-only reply) and to rows stored before it give the threads that
        # storing the same messages one by one gives, in one transaction per batch.
        before = [mail(1, "Plan"), mail(20, "Lunch on Friday?")]
        batch = [
            mail(3, "Re: Re: Plan", refs="<m1@x.test> <m2@x.test>", reply_to="<m2@x.test>"),
            mail(9, "Other"),
            mail(4, "Side note", reply_to="<m5@x.test>"),
            mail(5, "Note"),
            mail(2, "Re: Plan", refs="<m1@x.test> <m5@x.test>", reply_to="<m1@x.test>"),
            mail(21, "RE: Lunch on friday?"),
            mail(22, "Cinema"),
            mail(23, "Re: Cinema"),
            mail(9, "Other"),  # the same bytes again: one blob, two rows
        ]

        async def threads_of(one_by_one: bool) -> tuple[list[int], int]:
            store, user = await self.make_store()
            for raw in before:
                await store.add_message(user, raw)
            where = Location(user, None, None, "INBOX")
            if one_by_one:
                ids = [(await store.store_batch(where, [FetchedMessage(raw=r)])).created[0]
                       for r in batch]
            else:
                result = await store.store_batch(where, [FetchedMessage(raw=r) for r in batch])
                ids = result.created
                self.assertEqual(
                    result.thread_ids,
                    [(await store.get_message(user, i)).summary.thread_id for i in ids])
            groups: dict[int, int] = {}
            shape = [groups.setdefault(
                (await store.get_message(user, i)).summary.thread_id or -i, len(groups))
                for i in ids]

            def thread_rows(conn: Connection) -> int:
                return int(conn.execute(select(func.count()).select_from(threads)).scalar()
                           or 0)

            return shape, await self.scalar(thread_rows)

        one_by_one = await threads_of(True)
        self.assertEqual(one_by_one, ([0, 1, 0, 0, 0, 2, 3, 3, 1], 4))
        self.assertEqual(await threads_of(False), one_by_one)

    async def test_same_uid_twice_in_one_batch_is_stored_once(self) -> None:
        store, user = await self.make_store()
        folder_id = await self.db.run("make_folder", _make_folder, user)
        where = Location(user, None, folder_id, "INBOX", uidvalidity=7)
        result = await store.store_batch(where, [
            FetchedMessage(raw=mail(1, "a"), uid=1), FetchedMessage(raw=mail(1, "a"), uid=1),
            FetchedMessage(raw=mail(2, "b"), uid=2)])
        self.assertEqual((len(result.created), result.already_stored), (2, 1))

    async def test_subject_fallback_joins_replies_without_references(self) -> None:
        store, user = await self.make_store()
        a = await store.add_message(user, mail(1, "Lunch on Friday?"))
        b = await store.add_message(user, mail(2, "RE: Lunch on  friday?"))
        c = await store.add_message(user, mail(3, "Lunch on Friday?"))  # not a reply
        self.assertEqual([m.summary.id for m in await thread_of(store, user, b)], [a, b])
        self.assertEqual([m.summary.id for m in await thread_of(store, user, c)], [c])

    async def test_nul_in_body_subject_and_file_name_is_stored(self) -> None:
        """PostgreSQL's text refuses NUL: a message carrying one (in its body, an encoded
        word or a file name) is stored with U+FFFD there, its bytes untouched."""
        store, user = await self.make_store()
        raw = (b"Message-ID: <nul@x.test>\r\nSubject: =?utf-8?q?a=00b?=\r\n"
               b"From: alice@x.test\r\nDate: 1 Oct 2024 12:00:00 +0000\r\n"
               b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
               b"--B\r\nContent-Type: text/plain\r\n\r\nzebra\x00crossing\r\n"
               b"--B\r\nContent-Type: application/octet-stream\r\n"
               b"Content-Disposition: attachment; filename*=utf-8''f%00.bin\r\n\r\nxx\r\n"
               b"--B--\r\n")
        stored = await store.add_message(user, raw)
        self.assertEqual(await store.raw_message(user, stored), raw)
        message = await store.get_message(user, stored)
        self.assertEqual(message.summary.subject, "a\ufffdb")
        page = await store.list_messages(user, MessageQuery(q="zebra", ordering="id"))
        self.assertEqual([m.id for m in page.items], [stored])

    async def test_hostile_messages_in_a_batch_are_stored_with_the_others(self) -> None:
        """A From of 2,000 "(" and a message/rfc822 nested 400 deep overflowed the email
        package's stack: the batch failed, none of it was stored, and the folder's sync
        failed so on every later run. Both are stored, as are the good ones beside them."""
        store, user = await self.make_store()
        folder_id = await self.db.run("make_folder", _make_folder, user)
        where = Location(user, None, folder_id, "INBOX", uidvalidity=7)
        parens = b"From: " + b"(" * 2000 + b"\r\nSubject: parens\r\n\r\nbody\r\n"
        nested = b"Content-Type: text/plain\r\n\r\nhello\r\n"
        for _ in range(400):
            nested = b"Content-Type: message/rfc822\r\n\r\n" + nested
        nested = b"From: a@b.test\r\nSubject: nested\r\nMIME-Version: 1.0\r\n" + nested
        batch = [FetchedMessage(raw=mail(1, "good one"), uid=1),
                 FetchedMessage(raw=parens, uid=2), FetchedMessage(raw=nested, uid=3),
                 FetchedMessage(raw=mail(4, "good four"), uid=4)]
        result = await store.store_batch(where, batch)
        self.assertEqual(len(result.created), 4)
        stored = [await store.get_message(user, row_id) for row_id in result.created]
        self.assertEqual([m.summary.subject for m in stored],
                         ["good one", "parens", "nested", "good four"])
        for row_id, raw in zip(result.created, [b.raw for b in batch], strict=True):
            self.assertEqual(await store.raw_message(user, row_id), raw)

    async def test_long_non_ascii_ids_and_subjects_are_stored_and_thread(self) -> None:
        """A Message-ID of 980 four-byte characters (3,944 bytes), a subject of 2,500
        random CJK characters (its thread's key, 6,016 bytes) and a reference to such an id
        went past PostgreSQL's largest index entry (2,704 bytes): the batch failed, none of
        it was stored. They are cut to MAX_INDEXED_BYTES of UTF-8, the same way wherever
        they are compared, so the reply still finds its thread."""
        rnd = random.Random(7)
        long_id = "<" + "".join(chr(rnd.randrange(0x20000, 0x2A6DF)) for _ in range(980)) \
            + "@x.test>"
        cjk = "".join(chr(rnd.randrange(0x4E00, 0x9FFF)) for _ in range(2500))
        store, user = await self.make_store()
        folder_id = await self.db.run("make_folder", _make_folder, user)
        where = Location(user, None, folder_id, "INBOX", uidvalidity=7)
        batch = [FetchedMessage(raw=mail(1, "good", body="zebra"), uid=1),
                 FetchedMessage(raw=mail(2, "long id", body="giraffe", msgid=long_id), uid=2),
                 FetchedMessage(raw=mail(3, cjk, body="okapi"), uid=3),
                 FetchedMessage(raw=mail(4, "Re: long id", refs=long_id), uid=4)]
        result = await store.store_batch(where, batch)
        self.assertEqual(len(result.created), 4)
        first, long, wide, reply = result.created
        stored = await store.get_message(user, long)
        self.assertIn(len(stored.summary.message_id.encode()),
                      range(MAX_INDEXED_BYTES - 3, MAX_INDEXED_BYTES + 1))
        self.assertTrue(long_id.startswith(stored.summary.message_id))
        self.assertEqual((await store.get_message(user, wide)).summary.subject, cjk)
        self.assertEqual([m.summary.id for m in await thread_of(store, user, reply)],
                         [long, reply])
        # A later batch's reply finds the thread through the stored (cut) id and reference.
        later = await store.store_batch(where, [FetchedMessage(
            raw=mail(5, "Re: long id", reply_to=long_id, body="tapir"), uid=5)])
        self.assertEqual([m.summary.id for m in await thread_of(store, user, later.created[0])],
                         [long, reply, *later.created])
        for word, row_id in (("zebra", first), ("giraffe", long), ("okapi", wide)):
            page = await store.list_messages(user, MessageQuery(q=word, ordering="id"))
            self.assertEqual([m.id for m in page.items], [row_id])

    async def test_search_words_in_subject_body_sender_recipient(self) -> None:
        store, user = await self.make_store()
        ids = [
            await store.add_message(user, mail(1, "Quarterly réunion", body="Budget figures")),
            await store.add_message(user, mail(2, "Lunch", body="Meeting at the café",
                                               sender="Zoë <zoe@corp.test>")),
            await store.add_message(user, mail(3, "Other", body="nothing here",
                                               to="finance@corp.test")),
        ]

        async def found(q: str) -> list[int]:
            page = await store.list_messages(user, MessageQuery(q=q, ordering="id"))
            return [m.id for m in page.items]

        self.assertEqual(await found("budget"), [ids[0]])
        self.assertEqual(await found("REUNION"), [ids[0]])
        self.assertEqual(await found("réunion"), [ids[0]])
        self.assertEqual(await found("café"), [ids[1]])
        self.assertEqual(await found("zoe@corp.test"), [ids[1]])
        self.assertEqual(await found("corp zoë"), [ids[1]])
        self.assertEqual(await found("finance"), [ids[2]])
        self.assertEqual(await found("meet"), [ids[1]])  # prefix
        self.assertEqual(await found("meeting budget"), [])  # all words required
        self.assertEqual(await found('"); DROP TABLE messages; --'), [])
        self.assertEqual(await found("!!!"), [])
        self.assertEqual(await found('body OR "'), [])

    async def test_search_pages_in_date_order(self) -> None:
        """A search with no other filter, paged in date order both ways (PostgreSQL picks
        the page in its full-text table): the first page, one read from a remembered row,
        the deepest read from the other end, ties by id, only the user's own matches, and
        with a folder filter the same rows as through `messages`."""
        store, user = await self.make_store()
        other = await self.db.run("make_user", thd_make_user, "other")
        days = [5, 2, 9, 2, 7, 1, 9, 4]
        matching = [await store.add_message(user, mail(n, f"Apple {n}", day=day),
                                            folder="INBOX" if n % 2 else "Sent")
                    for n, day in enumerate(days)]
        for n in range(3):
            await store.add_message(other, mail(200 + n, "Apple pie", day=8))
        # Enough other mail that a page of matches is not read along the date index.
        folder_id = await self.db.run("make_folder", _make_folder, user)
        await store.store_batch(Location(user, None, folder_id, "INBOX", uidvalidity=7), [
            FetchedMessage(raw=mail(100 + n, "Pear", day=3), uid=n + 1) for n in range(100)])
        by_day = sorted(zip(days, matching, strict=True))
        oldest = [row_id for _, row_id in by_day]
        newest = oldest[::-1]

        async def pages(ordering: str, folder: str | None = None
                        ) -> tuple[list[int], set[int]]:
            seen: list[int] = []
            counts: set[int] = set()
            for offset in (0, 3, 6):
                page = await store.list_messages(user, MessageQuery(
                    q="apple", ordering=ordering, offset=offset, limit=3, folder=folder))
                seen.extend(m.id for m in page.items)
                counts.add(page.count)
            return seen, counts

        self.assertEqual(await pages("-date"), (newest, {8}))
        self.assertEqual(await pages("date"), (oldest, {8}))
        self.assertEqual(await pages("-date"), (newest, {8}))  # again: counts cached
        sent = [row_id for row_id in newest if matching.index(row_id) % 2 == 0]
        self.assertEqual(await pages("-date", folder="Sent"), (sent, {4}))
        threads = await store.list_threads(user, MessageQuery(q="apple", offset=3, limit=3))
        self.assertEqual(([m.id for m in threads.items], threads.count), (newest[3:6], 8))
        page = await store.list_messages(other, MessageQuery(q="apple"))
        self.assertEqual((page.count, len(page.items)), (3, 3))
        self.assertFalse({m.id for m in page.items} & set(matching))
        empty = await store.list_messages(user, MessageQuery(q="apple banana"))
        self.assertEqual((empty.count, empty.items), (0, []))

    async def test_a_page_is_unchanged_while_the_users_stamp_stands(self) -> None:
        store, user = await self.make_store()
        for n in range(2):
            await store.add_message(user, mail(n, f"Kiwi {n}"))
        page = await store.list_messages(user, MessageQuery())
        self.assertIsNotNone(page.stamp)
        for query in (MessageQuery(), MessageQuery(q="kiwi"), MessageQuery(threads_only=True)):
            again = await store.list_messages(user, query, unless=page.stamp)
            self.assertEqual((again.unchanged, again.items, again.stamp),
                             (True, [], page.stamp), query)
        other_folder = await store.list_messages(user, MessageQuery(folder_id=1),
                                                 unless=page.stamp)
        self.assertEqual((other_folder.unchanged, other_folder.stamp), (False, None))
        await store.add_message(user, mail(5, "Kiwi 5"))
        fresh = await store.list_messages(user, MessageQuery(q="kiwi"), unless=page.stamp)
        self.assertFalse(fresh.unchanged)
        self.assertEqual(fresh.count, 3)
        self.assertNotEqual(fresh.stamp, page.stamp)

    async def test_search_index_follows_every_writer(self) -> None:
        """The HTML text, attachment names and Cc are found; the index follows a change of
        an indexed column and a cascade delete (SQLite: FTS5 integrity-check holds)."""
        store, user = await self.make_store()
        html = mail(1, "Offer", extra="Cc: Carol <carol@z.test>").replace(
            b"text/plain", b"text/html").replace(
            b"body 1", b'<p class="glorp">Kumquat&nbsp;<b>pie</b></p>')
        attached = (b"Subject: Scan\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
                    b"--B\r\nContent-Type: text/plain\r\n\r\nsee file\r\n--B\r\n"
                    b"Content-Type: application/pdf; name=\"zanzibar.pdf\"\r\n"
                    b"Content-Disposition: attachment\r\n\r\n%PDF\r\n--B--\r\n")
        a = await store.add_message(user, html)
        b = await store.add_message(user, attached)
        folder_id = await self.db.run("make_folder", _make_folder, user)
        where = Location(user, None, folder_id, "INBOX", uidvalidity=7)
        synced = await store.store_batch(where, [FetchedMessage(raw=mail(5, "Walrus"), uid=1)])

        async def found(q: str) -> list[int]:
            page = await store.list_messages(user, MessageQuery(q=q, ordering="id"))
            return [m.id for m in page.items]

        self.assertEqual(await found("kumquat pie"), [a])
        self.assertEqual(await found("carol"), [a])
        self.assertEqual(await found("zanzibar"), [b])
        self.assertEqual(await found("walrus"), synced.created)
        self.assertEqual(await found("glorp"), [])  # the HTML's markup is not indexed

        if self.backend == "sqlite":  # PostgreSQL's index is written by the store alone
            def rename(conn: Connection) -> None:
                conn.execute(messages.update().where(messages.c.id == a).values(
                    subject="Tapir"))

            await self.db.run("rename", rename)
            self.assertEqual(await found("tapir"), [a])
            self.assertEqual(await found("offer"), [])

        def drop_account(conn: Connection) -> None:
            conn.execute(fetch_accounts.delete())

        await self.db.run("drop_account", drop_account)  # its messages go by cascade
        self.assertEqual(await found("walrus"), [])
        if self.backend == "sqlite":
            def check(conn: Connection) -> None:
                conn.exec_driver_sql(
                    "INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")

            await self.db.run("fts_check", check)
        self.assertEqual(await found("zanzibar"), [b])

    async def test_a_page_shows_every_field_as_the_message_itself_does(self) -> None:
        # On SQLite a page comes back as one JSON text (messages.store._in_one_row): the
        # text must come through whole, quotes, backslashes, controls and all, the times
        # aware, the numbers numbers, a missing value None.
        store, user = await self.make_store()
        awkward = 'Re: "quoted" \\back\\slash \t tab \u2028 \U0001F600 </script> [1,2]'
        first = await store.add_message(
            user, mail(1, awkward, day=2, sender='"O\'Brien, \\ J" <ob@x.test>'))
        stored = await store.store_batch(
            Location(user, None, None, "Tagged"),
            [FetchedMessage(mail(2, "plain", day=1, msgid="<>"), flags=("\\Seen", "$Label"))])
        second = stored.created[0]
        for ordering in ("-date", "date", "subject", "-size"):
            page = await store.list_messages(user, MessageQuery(ordering=ordering))
            shown = {m.id: m for m in page.items}
            for row_id in (first, second):
                self.assertEqual(shown[row_id], (await store.get_message(user, row_id)).summary)
        item = shown[first]
        self.assertEqual(item.subject, awkward)
        self.assertEqual(item.date, datetime.datetime(2024, 10, 2, 12, tzinfo=datetime.UTC))
        self.assertIsNotNone(item.created_at.tzinfo)
        self.assertIsInstance(item.size, int)
        self.assertIs(item.has_attachments, False)

    async def test_filters_ordering_and_pages(self) -> None:
        store, user = await self.make_store()
        for n in range(1, 13):
            await store.add_message(user, mail(n, f"S{n:02d}", day=n),
                                    folder="INBOX" if n % 2 else "Sent")
        page = await store.list_messages(user, MessageQuery(limit=5))
        self.assertEqual(page.count, 12)
        self.assertEqual([m.subject for m in page.items], ["S12", "S11", "S10", "S09", "S08"])
        page3 = await store.list_messages(user, MessageQuery(limit=5, offset=10))
        self.assertEqual([m.subject for m in page3.items], ["S02", "S01"])
        by_subject = await store.list_messages(user, MessageQuery(ordering="subject", limit=2))
        self.assertEqual([m.subject for m in by_subject.items], ["S01", "S02"])
        sent = await store.list_messages(user, MessageQuery(folder="Sent"))
        self.assertEqual(sent.count, 6)
        days = await store.list_messages(user, MessageQuery(
            date_from=datetime.date(2024, 10, 3), date_to=datetime.date(2024, 10, 5),
            ordering="date"))
        self.assertEqual([m.subject for m in days.items], ["S03", "S04", "S05"])
        with self.assertRaises(QueryError):
            await store.list_messages(user, MessageQuery(ordering="password"))
        self.assertEqual(await store.folder_names(user), ["INBOX", "Sent"])
        stats = await store.statistics(user)
        self.assertEqual(stats.folders, {"INBOX": 6, "Sent": 6})

    async def test_threads_view_one_row_per_thread(self) -> None:
        # A thread is shown by its first message (seed 001), and ordered by its date.
        store, user = await self.make_store()
        first = await store.add_message(user, mail(1, "Plan", day=1))
        await store.add_message(user, mail(2, "Re: Plan", reply_to="<m1@x.test>", day=5))
        alone = await store.add_message(user, mail(3, "Alone", day=3))
        page = await store.list_threads(user, MessageQuery())
        self.assertEqual(page.count, 2)
        self.assertEqual([(m.id, m.thread_count) for m in page.items],
                         [(alone, 1), (first, 2)])

    async def test_other_users_see_nothing(self) -> None:
        store, user = await self.make_store()
        other = await self.db.run("make_user", thd_make_user, "other")
        mine = await store.add_message(user, mail(1, "Secret plan", body="private words"))
        self.assertEqual((await store.list_messages(other, MessageQuery(q="private"))).count, 0)
        with self.assertRaises(MessageNotFound):
            await store.get_message(other, mine)
        with self.assertRaises(MessageNotFound):
            await store.raw_message(other, mine)

    async def test_attachments_listed_and_extracted(self) -> None:
        store, user = await self.make_store()
        raw = (b"Subject: files\r\nFrom: a@x.test\r\nContent-Type: multipart/mixed; "
               b"boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nsee file\r\n"
               b"--B\r\nContent-Type: text/csv\r\nContent-Disposition: attachment; "
               b"filename=\"data.csv\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
               b"YSxiCjEsMgo=\r\n--B--\r\n")
        row = await store.add_message(user, raw)
        page = await store.list_attachments(user, query="data")
        self.assertEqual([(a.filename, a.mime_type, a.size) for a in page.items],
                         [("data.csv", "text/csv", 8)])
        info, content = await store.attachment_content(user, page.items[0].id)
        self.assertEqual((info.message_row_id, content), (row, b"a,b\n1,2\n"))
        listed = await store.list_messages(user, MessageQuery(has_attachments=True))
        self.assertEqual([m.id for m in listed.items], [row])

    async def test_attachment_search_folds_every_letter(self) -> None:
        # SQLite's LIKE folded ASCII only, so "RÉSUMÉ" found nothing there; so did
        # PostgreSQL's ILIKE in a database of the C locale, as the test cluster's is (it
        # folds as LC_CTYPE does): now under ICU's root collation it folds every letter.
        store, user = await self.make_store()
        names = ["RÉSUMÉ.pdf", "résumé-2.txt", "Ärger.doc", "resume.txt", "50%_Ω.bin"]
        parts = b"".join(
            b"--B\r\nContent-Type: application/octet-stream\r\nContent-Disposition: "
            b"attachment; filename*=utf-8''" + quote(n).encode() + b"\r\n\r\nx\r\n"
            for n in names)
        await store.add_message(user, b"Subject: files\r\nFrom: a@x.test\r\nContent-Type: "
                                b"multipart/mixed; boundary=B\r\n\r\n" + parts + b"--B--\r\n")
        for query, found in [("RÉSUMÉ", names[:2]), ("résumé", names[:2]), ("Résumé.PDF",
                             names[:1]), ("ärger", names[2:3]), ("RESUME", names[3:4]),
                             ("%_ω", names[4:5]), ("É_", [])]:
            page = await store.list_attachments(user, query=query, sort="filename")
            self.assertEqual(sorted(a.filename for a in page.items), sorted(found), query)

    async def test_raw_bytes_read_in_chunks(self) -> None:
        await self.make_store()
        # Every byte value (NUL and 8-bit too): the slices are of bytes, not of text.
        raw = mail(1, "Large") + (bytes(range(256)) * 12_289)[:3 * 1024 * 1024 + 12_345]
        sha = hashlib.sha256(raw).hexdigest()
        now = datetime.datetime.now(datetime.UTC)
        await self.db.run("put_blob", thd_put_blobs, [(raw, sha)], now)
        for size in (RAW_CHUNK, 100_000, len(raw), len(raw) + 1):
            chunks = [c async for c in raw_chunks(self.db, sha, chunk_size=size)]
            self.assertEqual(b"".join(chunks), raw)
            self.assertTrue(all(len(c) == size for c in chunks[:-1]))
            self.assertLessEqual(len(chunks[-1]), size)
        self.assertEqual(len([c async for c in raw_chunks(self.db, sha)]), 4)
        # Slices at the edges, past the end, and of a blob that is not there.
        self.assertEqual(await self.db.read("t", thd_raw_slice, sha, 0, 5), raw[:5])
        self.assertEqual(await self.db.read("t", thd_raw_slice, sha, len(raw) - 3, 10),
                         raw[-3:])
        self.assertEqual(await self.db.read("t", thd_raw_slice, sha, len(raw), 10), b"")
        self.assertIsNone(await self.db.read("t", thd_raw_slice, "0" * 64, 0, 10))
        self.assertEqual([c async for c in raw_chunks(self.db, "0" * 64)], [])
        # A reader that stops early leaves nothing behind.
        gen = raw_chunks(self.db, sha, chunk_size=1000)
        self.assertEqual(await gen.__anext__(), raw[:1000])
        await gen.aclose()


    async def test_search_within_one_account_or_folder(self) -> None:
        """A search narrowed to one account or one folder finds that account's matches
        only (newest first), whichever way the database reads them."""
        store, user = await self.make_store()
        mine = await self.db.run("accounts", _accounts_with_folders, user, 2)
        found = {}
        for index, ((account, folder), words) in enumerate(zip(
                mine, (["apple", "apple", "pear", "apple"], ["apple", "kiwi", "apple"]),
                strict=True)):
            result = await store.store_batch(
                Location(user, account, folder, "INBOX", uidvalidity=7),
                [FetchedMessage(raw=mail(10 * index + n, f"{word} {n}", day=n + 1), uid=n + 1)
                 for n, word in enumerate(words)])
            found[account] = [row_id for row_id, word in zip(result.created, words, strict=True)
                              if word == "apple"][::-1]
        # Enough other mail that a page of matches is not read along the date index.
        await store.store_batch(Location(user, mine[0][0], mine[0][1], "INBOX", uidvalidity=7), [
            FetchedMessage(raw=mail(100 + n, "Pear", day=3), uid=100 + n) for n in range(100)])
        loose = await store.add_message(user, mail(99, "apple alone"))
        for (account, _folder), query in (
                *((pair, MessageQuery(q="apple", account_id=pair[0])) for pair in mine),
                *((pair, MessageQuery(q="apple", folder_id=pair[1])) for pair in mine),
                *((pair, MessageQuery(q="apple", account_id=pair[0], folder="INBOX"))
                  for pair in mine)):
            page = await store.list_messages(user, query)
            self.assertEqual(([m.id for m in page.items], page.count),
                             (found[account], len(found[account])), query)
        page = await store.list_messages(user, MessageQuery(q="apple"))
        self.assertEqual(page.count, 6)
        self.assertIn(loose, [m.id for m in page.items])


    async def small_account_beside_a_big_one(self) -> tuple[MessageStore, int, int, list[int]]:
        """A user's big account of newer mail and small one of older mail: (store, user,
        the small account, its message ids newest first)."""
        store, user = await self.make_store()
        (big, big_inbox), (small, small_inbox) = await self.db.run(
            "accounts", _accounts_with_folders, user, 2)
        await store.store_batch(Location(user, big, big_inbox, "INBOX", uidvalidity=7), [
            FetchedMessage(raw=mail(n, f"new {n}", day=20), uid=n + 1) for n in range(300)])
        result = await store.store_batch(
            Location(user, small, small_inbox, "INBOX", uidvalidity=7),
            [FetchedMessage(raw=mail(1000 + n, f"old {n}", day=n + 1), uid=n + 1)
             for n in range(5)])
        return store, user, small, result.created[::-1]

    async def test_a_small_accounts_list_beside_a_big_one(self) -> None:
        store, user, small, newest_first = await self.small_account_beside_a_big_one()
        for query in (MessageQuery(account_id=small), MessageQuery(account_id=small,
                                                                     folder="INBOX")):
            page = await store.list_messages(user, query)
            self.assertEqual(([m.id for m in page.items], page.count), (newest_first, 5))
            page = await store.list_messages(user, MessageQuery(
                **{**query.__dict__, "ordering": "date", "limit": 2}))
            self.assertEqual([m.id for m in page.items], newest_first[::-1][:2])


    async def test_a_pop3_accounts_mail_is_left_out_through_indexes(self) -> None:
        """`without_pop` (the IMAP2API's reads) leaves a POP3 account's mail out of every
        read, and reads no table whole for it: with no such account, one look-up by the
        user's accounts index; with one, the lists go on down the user's indexes."""
        store, user, small, newest_first = await self.small_account_beside_a_big_one()
        every = MessageQuery(limit=500)
        self.assertEqual((await store.list_messages(user, every)).count, 305)
        with engine_query_plans(self.db.engine) as plans:
            page = await store.list_messages(user, MessageQuery(without_pop=True))
        self.assertEqual(page.count, 305)
        self.assertEqual(full_scans(plans, "messages", "fetch_accounts", "message_counts"), [])

        def to_pop(conn: Connection) -> None:
            conn.execute(fetch_accounts.update().where(fetch_accounts.c.id == small)
                         .values(protocol="pop"))

        await self.db.run("to_pop", to_pop)
        shown = [m.id for m in (await store.list_messages(user, every)).items
                 if m.id not in newest_first]
        with engine_query_plans(self.db.engine) as plans:
            for query in (MessageQuery(without_pop=True), MessageQuery(without_pop=True,
                                                                        ordering="date"),
                          MessageQuery(without_pop=True, offset=250, limit=100),
                          MessageQuery(without_pop=True, threads_only=True, limit=500),
                          MessageQuery(without_pop=True, folder="INBOX", limit=500),
                          MessageQuery(without_pop=True, q="old"),
                          MessageQuery(without_pop=True, account_id=small)):
                page = await store.list_messages(user, query)
                expected = 0 if query.q or query.account_id else 300
                self.assertEqual(page.count, expected, query)
                self.assertFalse({m.id for m in page.items} & set(newest_first), query)
            self.assertEqual((await store.statistics(user, without_pop=True)).total_emails,
                             300)
            self.assertEqual(await store.folder_names(user, small, without_pop=True), [])
            with self.assertRaises(MessageNotFound):
                await store.message_and_thread(user, newest_first[0], without_pop=True)
            detail, _ = await store.message_and_thread(user, shown[0], without_pop=True)
        self.assertEqual(detail.summary.id, shown[0])
        self.assertEqual(full_scans(plans, "messages", "fetch_accounts", "message_counts"), [])
        for _ in range(2):  # the second time from the marks the first one left
            paged = [m.id for offset in range(0, 300, 40) for m in (await store.list_messages(
                user, MessageQuery(without_pop=True, offset=offset, limit=40))).items]
            self.assertEqual(paged, shown)

    def count_statements(self) -> list[str]:
        """The statements run from now on (those run straight on the driver, `Prepared`,
        too): on PostgreSQL, each one a round trip."""
        seen: list[str] = []
        real = Prepared.rows

        def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            seen.append(statement)

        def rows(prepared: Prepared, conn: Connection, values: Any) -> list[Any]:
            seen.append(str(prepared.statement))
            return real(prepared, conn, values)

        event.listen(self.db.engine, "before_cursor_execute", hook)
        self.addCleanup(event.remove, self.db.engine, "before_cursor_execute", hook)
        self.patch(Prepared, "rows", rows)
        return seen

    async def test_leaving_pop3_mail_out_costs_a_list_no_statement_more(self) -> None:
        """A user none of whose POP3 accounts holds mail (nearly all) is told so by the
        statement that reads a list's stamp (and a plain list's count): `without_pop` reads
        a page (a plain one, a search, threads, a date range), or finds a kept one
        unchanged, in as many statements as a read without it (it took one more: on
        PostgreSQL a round trip more on every IMAP2API list); an account turned to POP3
        (which moves no stamp) is still seen at once."""
        store, user, small, newest_first = await self.small_account_beside_a_big_one()
        seen = self.count_statements()

        async def statements(query: MessageQuery, **kw: Any) -> tuple[int, Any]:
            del seen[:]
            page = await store.list_messages(user, query, **kw)
            return len(seen), page

        for as_json in (False, True):
            for query in (MessageQuery(), MessageQuery(offset=100, limit=40),
                          MessageQuery(offset=250, limit=40, ordering="date"),
                          MessageQuery(account_id=small), MessageQuery(q="old"),
                          MessageQuery(threads_only=True, limit=20),
                          MessageQuery(date_from=datetime.date(2024, 10, 2), limit=20)):
                await store.list_messages(user, query, as_json=as_json)  # (the marks)
                n, page = await statements(query, as_json=as_json)
                self.assertTrue(n)
                n_without, page_without = await statements(
                    dataclasses.replace(query, without_pop=True), as_json=as_json)
                self.assertEqual((n_without, page_without), (n, page), (query, as_json))
                n, page = await statements(query, unless=page.stamp)
                n_without, page_without = await statements(
                    dataclasses.replace(query, without_pop=True), unless=page.stamp)
                self.assertTrue(page.unchanged)
                self.assertEqual((n_without, page_without), (n, page), (query, as_json))

        def to_pop(conn: Connection) -> None:
            conn.execute(fetch_accounts.update().where(fetch_accounts.c.id == small)
                         .values(protocol="pop"))

        stamp = page.stamp
        await self.db.run("to_pop", to_pop)
        for as_json in (False, True):
            page = await store.list_messages(user, MessageQuery(without_pop=True, limit=500),
                                             unless=stamp, as_json=as_json)
            self.assertFalse(page.unchanged)
            self.assertEqual(page.count, 300)
            if not as_json:
                self.assertFalse({m.id for m in page.items} & set(newest_first))

    async def test_leaving_pop3_mail_out_costs_a_read_no_statement_more(self) -> None:
        """The IMAP2API's other reads of a user none of whose POP3 accounts holds mail (an
        e-mail and its thread, a thread's details, its folders, its statistics) ask
        whether there is one in a statement they run anyway: as many statements as
        without `without_pop` (they took one more each, on PostgreSQL a round trip)."""
        store, user, small, newest_first = await self.small_account_beside_a_big_one()
        seen = self.count_statements()

        async def reads(without_pop: bool) -> tuple[list[int], Any]:
            counted: list[int] = []
            found: list[Any] = []
            for read in (
                    lambda: store.message_and_thread(user, newest_first[0],
                                                     without_pop=without_pop),
                    lambda: store.thread_ids(user, newest_first[0], without_pop=without_pop),
                    lambda: store.folder_names(user, without_pop=without_pop),
                    lambda: store.folder_names(user, small, without_pop=without_pop),
                    lambda: store.statistics(user, without_pop=without_pop),
                    lambda: store.statistics(user, small, without_pop=without_pop)):
                del seen[:]
                found.append(await read())
                counted.append(len(seen))
            del seen[:]
            found.append([d async for d in store.details_of(user, newest_first[:3],
                                                            without_pop=without_pop)])
            counted.append(len(seen))
            return counted, found

        await reads(False)  # (one account's thread total counted, then kept)
        counted, found = await reads(False)
        self.assertTrue(all(counted), counted)
        self.assertEqual(await reads(True), (counted, found))

    async def test_statistics_without_pop3_mail_count_threads_once_a_stamp(self) -> None:
        """The IMAP2API's statistics of a user whose POP3 account holds mail count the
        threads of the other messages (the kept totals count them all): once while the
        user's change stamp stands (each call counted over all the user's messages:
        seconds for a million, as often as the rate limit let a client ask)."""
        store, user, small, _newest_first = await self.small_account_beside_a_big_one()

        def to_pop(conn: Connection) -> None:
            conn.execute(fetch_accounts.update().where(fetch_accounts.c.id == small)
                         .values(protocol="pop"))

        await self.db.run("to_pop", to_pop)
        seen = self.count_statements()

        def counts() -> int:
            return len([s for s in seen if "count(distinct" in s.lower()])

        stats = await store.statistics(user, without_pop=True)
        self.assertEqual((stats.total_emails, stats.total_threads), (300, 300))
        self.assertEqual(counts(), 1)
        again = await store.statistics(user, without_pop=True)
        self.assertEqual(again, stats)
        self.assertEqual(counts(), 1)
        # Every thread of both accounts (the kept total), then one account's: counted
        # apart, once.
        self.assertEqual((await store.statistics(user)).total_threads, 305)
        for _ in range(2):
            self.assertEqual((await store.statistics(user, small)).total_threads, 5)
        self.assertEqual(counts(), 2)
        # A message stored moves the stamp: counted again.
        await store.store_batch(Location(user, None, None, "INBOX"),
                                [FetchedMessage(raw=mail(5000, "loose", day=3))])
        self.assertEqual((await store.statistics(user, without_pop=True)).total_threads, 301)
        self.assertEqual(counts(), 3)

    async def test_what_a_cut_short_sync_stored_is_counted_from_an_index(self) -> None:
        """An interrupted sync is settled (FetchEngine.thd_settle_interrupted) by a write
        transaction that counts the messages the account stored since the sync began:
        through ix_messages_account_created (migration 0065) from the index alone, not
        every message of the account (0.7 s for 300,000, SQLite's write lock held)."""
        store, user = await self.make_store()
        clock = store.clock
        assert isinstance(clock, Clock)
        (a, a_inbox), (b, b_inbox) = await self.db.run(
            "accounts", _accounts_with_folders, user, 2)
        in_a = Location(user, a, a_inbox, "INBOX", uidvalidity=1)
        in_b = Location(user, b, b_inbox, "INBOX", uidvalidity=1)
        await store.store_batch(in_a, [FetchedMessage(raw=mail(i, "old"), uid=i)
                                       for i in range(1, 4)])
        clock.advance(100)
        since = datetime.datetime.fromtimestamp(clock.seconds(), datetime.UTC)
        await store.store_batch(in_a, [FetchedMessage(raw=mail(i, "new"), uid=i)
                                       for i in range(4, 6)])
        await store.store_batch(in_b, [FetchedMessage(raw=mail(i, "b's"), uid=i)
                                       for i in range(6, 9)])
        with engine_query_plans(self.db.engine) as plans:
            self.assertEqual(await self.db.read("count", thd_created_since, a, since), 2)
        self.assertEqual(full_scans(plans, "messages"), [])
        self.assertTrue([p for p in plans if "ix_messages_account_created" in p], plans)


class SQLiteStoreTests(StoreTestsMixin, TestCase):
    backend = "sqlite"

    async def test_a_list_of_one_account_is_read_through_its_indexes(self) -> None:
        """SQLite (no statistics) reads a list of one account, or one of its folders,
        through the account's indexes, not down the user's date index picking the
        account's rows out (47 ms a page for a small account of old mail beside 100,000
        newer messages)."""
        _store, user, small, _ids = await self.small_account_beside_a_big_one()

        def plans(conn: Connection) -> list[list[str]]:
            def reads() -> None:
                for query in (MessageQuery(account_id=small),
                              MessageQuery(account_id=small, folder="INBOX"),
                              MessageQuery(account_id=small, ordering="date")):
                    self.assertEqual(thd_list_messages(conn, user, query).count, 5)

            return driver_query_plans(conn, lambda statement: "LIMIT" in statement, reads)

        found = await self.db.read("plans", plans)
        self.assertEqual(len(found), 3, found)
        expected = ("ix_messages_account_date", "ix_messages_account_folder_date",
                    "ix_messages_account_date")
        for steps, index in zip(found, expected, strict=True):
            self.assertTrue([s for s in steps if f"USING INDEX {index} " in s], steps)
            self.assertFalse([s for s in steps if "ix_messages_user" in s], steps)

    async def test_a_search_in_one_account_is_read_through_its_matches(self) -> None:
        """SQLite (no statistics) reads a search narrowed to an account or a folder through
        the full-text matches, not by walking every message of the account or folder and
        looking each up in the matches (15 to 150 ms over 100,000 messages)."""
        store, user = await self.make_store()
        [(account, folder)] = await self.db.run("accounts", _accounts_with_folders, user, 1)
        await store.store_batch(Location(user, account, folder, "INBOX", uidvalidity=7), [
            FetchedMessage(raw=mail(n, "Apple" if n % 10 == 0 else "Pear"), uid=n + 1)
            for n in range(200)])

        def plans(conn: Connection) -> list[list[str]]:
            def reads() -> None:
                for query in (MessageQuery(q="apple", account_id=account),
                              MessageQuery(q="apple", folder_id=folder),
                              MessageQuery(q="apple", account_id=account, folder="INBOX")):
                    self.assertEqual(thd_list_messages(conn, user, query).count, 20)

            return query_plans(conn, lambda statement: "MATCH" in statement, reads)

        found = await self.db.read("plans", plans)
        self.assertEqual(len(found), 6)  # each query's count and page
        for steps in found:
            self.assertIn("SCAN messages_fts VIRTUAL TABLE INDEX 0:M6", steps)
            self.assertFalse([s for s in steps if "USING INDEX" in s and "messages " in s],
                             steps)


class PostgreSQLStoreTests(StoreTestsMixin, TestCase):
    backend = "postgresql"

    async def test_a_list_of_one_account_is_read_through_its_indexes_in_a_generic_plan(
        self,
    ) -> None:
        """A prepared statement run often gets a generic plan, which knows neither the
        user nor the account. A list of one account (or one of its folders) must still be
        read through the account's indexes, not down the user's date index: that walk
        covers all of the user's newer mail for a small account of old mail."""
        _store, user, small, _ids = await self.small_account_beside_a_big_one()

        def txn(conn: Connection) -> list[list[str]]:
            # 20,000 more of the big account's rows, newer than the small account's, in
            # ten more folders.
            conn.exec_driver_sql(
                "INSERT INTO messages (user_id, account_id, folder_id, folder, uidvalidity, "
                "uid, message_id, subject, sender, recipient, date, size, sha256, "
                "created_at, updated_at) "
                "SELECT m.user_id, m.account_id, m.folder_id, 'F' || mod(g, 10), m.uidvalidity, "
                "1000 + g, m.message_id || g, m.subject, m.sender, m.recipient, "
                "m.date + g * interval '1 minute', m.size, m.sha256, m.created_at, "
                f"m.updated_at FROM (SELECT * FROM messages WHERE account_id <> {small} "
                "LIMIT 1) AS m, generate_series(1, 20000) AS g")
            conn.exec_driver_sql("ANALYZE messages")
            conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            dialect = postgresql.psycopg.dialect(paramstyle="numeric_dollar")  # type: ignore[attr-defined]
            values = {"user_id": user, "account_id": small, "folder": "INBOX"}
            plans = []
            for shape in (("account_id",), ("folder", "account_id")):
                statement = _plain_page(shape, "date", True, False, False, (0, 50)).statement
                compiled = statement.compile(dialect=dialect)
                binds = [compiled.binds[key] for key in compiled.positiontup or ()]
                # A parameter used twice gets an anonymous key ending in its name.
                names = [b.key if b.key in values else b.key.split()[-1].removesuffix(")s")
                         for b in binds]
                args = ", ".join(repr(values[n]) for n in names).replace('"', "'")
                conn.exec_driver_sql(f"PREPARE page AS {compiled}")
                plans.append([row[0] for row in conn.exec_driver_sql(
                    f"EXPLAIN EXECUTE page ({args})")])
                conn.exec_driver_sql("DEALLOCATE page")
            return plans

        by_account, by_folder = await self.db.run("plans", txn)
        self.assertIn("ix_messages_account_date", " ".join(by_account), by_account)
        self.assertIn("ix_messages_account_folder_date", " ".join(by_folder), by_folder)
        for plan in (by_account, by_folder):
            self.assertNotIn("ix_messages_user", " ".join(plan), plan)


class PageJSONTests(TestCase):
    def test_what_orjson_refuses_is_read_by_the_standard_library(self) -> None:
        # A lone surrogate (text stored before input was checked for them) written as
        # SQLite's json functions write it: orjson refuses it, the page still reads.
        text = '[[1,"a\\ud800b",null,"2024-10-02 12:00:00.000000"]]'
        self.assertEqual(_json_rows(text),
                         [[1, "a\ud800b", None, "2024-10-02 12:00:00.000000"]])
        self.assertEqual(_json_rows('[[1,"\u00e9\\t",9007199254740993]]'),
                         [[1, "\u00e9\t", 9007199254740993]])
