"""The Mail API listing (`MailService.page`) on SQLite and on PostgreSQL: keyset pages
newest first with their cursors, the count, the mailboxes a user may read (own and granted
with `allow_read`, never others'), every field of a listed mail as the store holds it, and
the attachments of each mail of a page in their order.

The web tests (tests.test_mailapi_mail) run on the in-memory SQLite store; these run the
same reads on a real database of each backend through tests.support.db.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, insert, select
from sqlalchemy.dialects import postgresql
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.mailapi import listing
from mailcore.mailapi import mail as mail_module
from mailcore.mailapi.errors import MailApiError
from mailcore.mailapi.files import MailFiles
from mailcore.mailapi.listing import AttachmentInfo
from mailcore.mailapi.mail import GoneSweeper, MailService
from mailcore.messages.sql import new_id
from mailcore.store.schema import (
    mailapi_attachments,
    mailapi_gone,
    mailapi_mail,
    mailbox_grants,
    mailboxes,
)
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user

NO_RIGHTS = {"allow_read": False, "allow_send": False, "allow_reply_to": False,
             "allow_delete": False, "allow_modify": False}


def thd_mailbox(conn: Connection, address: str, owner: int, mail_count: int = 0) -> int:
    return new_id(conn.execute(insert(mailboxes).values(
        address=address, owner_id=owner, created_at=1.0, mail_count=mail_count)))


def thd_mail(conn: Connection, mailbox: int, n: int, **values: Any) -> int:
    row = {"public_id": f"m{n:06d}", "mailbox_id": mailbox, "status": "inbox",
           "read": n % 2 == 0, "mail_from": f"Sender {n} <s{n}@far.test>",
           "to_addrs": "a@hosted.test", "subject": f"mail {n}", "body": f"body {n}\n",
           "created_at": 1_700_000_000.5 + n, **values}
    return new_id(conn.execute(insert(mailapi_mail).values(**row)))


class ListingTestsMixin(DatabaseMixin):
    async def setUp(self) -> None:  # type: ignore[override]
        self.db = await self.open_database()
        self.mail = MailService(self.db, Clock(), "mx.test", MailFiles(Path(self.mktemp())),
                                CpuPool.for_tests())

        def txn(conn: Connection) -> dict[str, int]:
            ids = {name: thd_make_user(conn, name) for name in ("bob", "joe", "eve")}
            ids["bob_box"] = thd_mailbox(conn, "bob@hosted.test", ids["bob"])
            ids["joe_box"] = thd_mailbox(conn, "joe@hosted.test", ids["joe"])
            ids["eve_box"] = thd_mailbox(conn, "eve@hosted.test", ids["eve"])
            return ids

        self.ids = await self.db.run("setup", txn)

    async def add(self, box: str, numbers: range, **values: Any) -> list[int]:
        def txn(conn: Connection) -> list[int]:
            made = [thd_mail(conn, self.ids[box], n, **values) for n in numbers]
            conn.execute(mailboxes.update().where(mailboxes.c.id == self.ids[box])
                         .values(mail_count=mailboxes.c.mail_count + len(made)))
            return made

        return await self.db.run("add", txn)

    async def grant(self, box: str, user: str, **rights: bool) -> None:
        await self.db.run("grant", lambda conn: conn.execute(insert(mailbox_grants).values(
            mailbox_id=self.ids[box], user_id=self.ids[user], **{**NO_RIGHTS, **rights})))

    async def subjects(self, user: str, count: int, cursor: str | None = None
                       ) -> tuple[list[str], int, str | None, str | None]:
        page = await self.mail.page(self.ids[user], count, cursor)
        return ([m.fields["subject"] for m in page.emails], page.count, page.previous_id,
                page.next_id)

    async def test_keyset_pages_both_ways(self) -> None:
        await self.add("bob_box", range(1, 8))
        self.assertEqual(await self.subjects("bob", 3),
                         (["mail 7", "mail 6", "mail 5"], 7, None, "m000004"))
        self.assertEqual(await self.subjects("bob", 3, "m000004"),
                         (["mail 4", "mail 3", "mail 2"], 7, "m000007", "m000001"))
        self.assertEqual(await self.subjects("bob", 3, "m000001"),
                         (["mail 1"], 7, "m000004", None))
        self.assertEqual(await self.subjects("bob", 3, "m000006"),
                         (["mail 6", "mail 5", "mail 4"], 7, "m000007", "m000003"))
        self.assertEqual(await self.subjects("bob", 7), (
            [f"mail {n}" for n in range(7, 0, -1)], 7, None, None))
        await self.add("bob_box", range(8, 10))  # new mail does not shift a cursor's page
        self.assertEqual(await self.subjects("bob", 3, "m000004"),
                         (["mail 4", "mail 3", "mail 2"], 9, "m000007", "m000001"))

    async def test_a_page_of_large_mail_holds_what_fits_and_the_next_goes_on(self) -> None:
        # A page read every field of up to `count` mails at once: 25 inbox mails of 4 MB
        # bodies took 300 MB of the daemon's memory for one GET (a body may be 50 MB, the
        # SMTP server's limit, and `count` 1,000). Now a page stops once its mails' fields
        # are over PAGE_CHARS characters (8 MiB; the first mail always), and next_page_id
        # names the first one left out.
        big = "x" * (3 * 1024 * 1024)
        await self.add("bob_box", range(1, 6), body=big)
        await self.add("bob_box", range(6, 7), body="y" * (9 * 1024 * 1024))
        seen: list[tuple[list[str], str | None]] = []
        cursor = None
        while True:
            page = await self.mail.page(self.ids["bob"], 25, cursor)
            seen.append(([m.public_id for m in page.emails], page.next_id))
            self.assertEqual(page.count, 6)
            if page.next_id is None:
                break
            cursor = page.next_id
        self.assertEqual(seen, [(["m000006"], "m000005"), (["m000005", "m000004"], "m000003"),
                                (["m000003", "m000002"], "m000001"), (["m000001"], None)])
        page = await self.mail.page(self.ids["bob"], 2, "m000003")
        self.assertEqual([len(m.fields["body"]) for m in page.emails], [len(big)] * 2)

    async def test_a_listed_mail_has_every_field_as_stored(self) -> None:
        await self.add("bob_box", range(1, 2), cc_addrs="c@far.test", bcc_addrs="b@far.test",
                       reply_to="r@far.test", status="draft")
        await self.add("bob_box", range(2, 3), subject="", body="", read=False)
        page = await self.mail.page(self.ids["bob"], 10, None)
        second, first = page.emails
        self.assertEqual((first.public_id, first.mailbox, first.status, first.read,
                          first.created_at, first.attachments),
                         ("m000001", "bob@hosted.test", "draft", False, 1_700_000_001.5, ()))
        self.assertIs(type(first.read), bool)
        self.assertIsInstance(first.id, int)
        self.assertEqual(first.fields, {
            "to": "a@hosted.test", "cc": "c@far.test", "bcc": "b@far.test",
            "reply-to": "r@far.test", "from": "Sender 1 <s1@far.test>", "subject": "mail 1",
            "body": "body 1\n"})
        self.assertEqual((second.status, second.read, second.fields["subject"],
                          second.fields["body"]), ("inbox", False, "", ""))

    async def test_attachments_of_each_mail_in_their_order(self) -> None:
        ids = await self.add("bob_box", range(1, 5))

        def txn(conn: Connection) -> None:
            # Added out of mail order: each mail's are numbered in the order they were added.
            for mail_id, name, size in ((ids[2], "c.pdf", 3), (ids[0], "a.txt", 1),
                                        (ids[2], "d.png", 4), (ids[3], "far.bin", 9),
                                        (ids[0], "b.txt", 2)):
                conn.execute(insert(mailapi_attachments).values(
                    mail_id=mail_id, name=name, content_type="application/x-test", size=size,
                    sha256="0" * 64))

        await self.db.run("attach", txn)
        page = await self.mail.page(self.ids["bob"], 3, "m000003")
        self.assertEqual([(m.public_id, m.attachments) for m in page.emails], [
            ("m000003", (AttachmentInfo(1, "c.pdf", "application/x-test", 3),
                         AttachmentInfo(2, "d.png", "application/x-test", 4))),
            ("m000002", ()),
            ("m000001", (AttachmentInfo(1, "a.txt", "application/x-test", 1),
                         AttachmentInfo(2, "b.txt", "application/x-test", 2))),
        ])

    async def test_own_and_readable_granted_mailboxes_only(self) -> None:
        await self.add("bob_box", range(1, 3))
        await self.add("joe_box", range(3, 5))
        await self.add("eve_box", range(5, 7))
        await self.grant("joe_box", "bob", allow_read=True)
        await self.grant("eve_box", "bob", allow_send=True, allow_delete=True)  # no read
        page = await self.mail.page(self.ids["bob"], 10, None)
        self.assertEqual([(m.fields["subject"], m.mailbox) for m in page.emails], [
            ("mail 4", "joe@hosted.test"), ("mail 3", "joe@hosted.test"),
            ("mail 2", "bob@hosted.test"), ("mail 1", "bob@hosted.test")])
        self.assertEqual(page.count, 4)
        # Keyset pages run across the mailboxes too.
        self.assertEqual(await self.subjects("bob", 1, "m000003"),
                         (["mail 3"], 4, "m000004", "m000002"))
        # eve reads her own mail only, and joe his: a grant goes one way.
        self.assertEqual(await self.subjects("eve", 10), (["mail 6", "mail 5"], 2, None, None))
        self.assertEqual(await self.subjects("joe", 10), (["mail 4", "mail 3"], 2, None, None))

    async def test_a_cursor_of_mail_one_may_not_read_is_invalid(self) -> None:
        await self.add("bob_box", range(1, 3))
        await self.add("eve_box", range(3, 5))
        await self.grant("eve_box", "bob", allow_send=True)
        for user, cursor in (("bob", "m000003"), ("eve", "m000001"), ("bob", "nosuch1"),
                             ("joe", "m000001")):
            with self.assertRaises(MailApiError) as caught:
                await self.mail.page(self.ids[user], 10, cursor)
            self.assertEqual((caught.exception.kind, caught.exception.message,
                              caught.exception.field), ("invalid", "invalid cursor", "cursor"))

    async def test_a_cursor_of_deleted_mail_goes_on_from_its_place(self) -> None:
        # A cursor naming mail deleted before the next request was 400 'invalid cursor':
        # a client walking its mail while deleting it could not go on. The place the mail
        # left is kept (GONE_KEEP), for those who may read its mailbox only.
        await self.add("bob_box", range(1, 8))
        await self.add("eve_box", range(8, 9))
        await self.grant("bob_box", "joe", allow_read=True)
        self.assertEqual(await self.subjects("bob", 3, "m000004"),
                         (["mail 4", "mail 3", "mail 2"], 7, "m000007", "m000001"))
        await self.mail.delete(self.ids["bob"], "m000004")
        await self.mail.delete(self.ids["bob"], "m000007")
        self.assertEqual(await self.subjects("bob", 3, "m000004"),
                         (["mail 3", "mail 2", "mail 1"], 5, "m000006", None))
        self.assertEqual(await self.subjects("bob", 3, "m000007"),
                         (["mail 6", "mail 5", "mail 3"], 5, None, "m000002"))
        self.assertEqual(await self.subjects("joe", 3, "m000004"),
                         (["mail 3", "mail 2", "mail 1"], 5, "m000006", None))
        await self.mail.delete(self.ids["eve"], "m000008")
        # Who may not read the mailbox gets what an id no mail ever had gets.
        for user, cursor in (("eve", "m000004"), ("bob", "m000008"), ("joe", "m000008"),
                             ("bob", "nosuch1")):
            with self.assertRaises(MailApiError) as caught:
                await self.mail.page(self.ids[user], 10, cursor)
            self.assertEqual(caught.exception.message, "invalid cursor")
        # Kept GONE_KEEP seconds.
        self.mail.clock.advance(listing.GONE_KEEP + 1)  # type: ignore[attr-defined]
        await self.mail.delete(self.ids["bob"], "m000001")
        with self.assertRaises(MailApiError):
            await self.mail.page(self.ids["bob"], 3, "m000004")
        self.assertEqual(await self.subjects("bob", 3, "m000001"), ([], 4, "m000005", None))

    async def gone_rows(self) -> list[str]:
        return sorted(await self.db.read("gone", lambda conn: [
            r[0] for r in conn.execute(select(mailapi_gone.c.public_id))]))

    async def test_a_place_kept_past_gone_keep_is_no_cursor_and_waits_for_the_sweep(
            self) -> None:
        # Each delete and send deleted every place kept longer than GONE_KEEP in its own
        # transaction (on SQLite inside the spool's group commit, under the one write
        # lock). Now they only write their place; a place older than GONE_KEEP is no
        # cursor whether or not it is deleted yet, and the sweep deletes it.
        clock: Clock = self.mail.clock  # type: ignore[assignment]
        await self.add("bob_box", range(1, 6))
        await self.mail.delete(self.ids["bob"], "m000004")
        clock.advance(listing.GONE_KEEP - 1)
        self.assertEqual(await self.subjects("bob", 2, "m000004"),
                         (["mail 3", "mail 2"], 4, "m000005", "m000001"))
        clock.advance(2)
        with self.assertRaises(MailApiError) as caught:
            await self.mail.page(self.ids["bob"], 2, "m000004")
        self.assertEqual(caught.exception.message, "invalid cursor")
        await self.mail.delete(self.ids["bob"], "m000002")
        self.assertEqual(await self.gone_rows(), ["m000002", "m000004"])
        self.assertEqual(await self.mail.sweep_gone(), 1)
        self.assertEqual(await self.gone_rows(), ["m000002"])
        self.assertEqual(await self.subjects("bob", 2, "m000002"), (["mail 1"], 3, "m000005",
                                                                    None))

    async def test_the_gone_sweep_deletes_expired_places_a_batch_a_transaction(self) -> None:
        clock: Clock = self.mail.clock  # type: ignore[assignment]
        clock.advance(listing.GONE_KEEP + 100)
        now = clock.seconds()

        def txn(conn: Connection) -> None:
            conn.execute(insert(mailapi_gone), [
                {"public_id": f"x{n}", "mail_id": n, "mailbox_id": self.ids["bob_box"],
                 "gone_at": now - listing.GONE_KEEP - n} for n in range(1, 6)] + [
                {"public_id": f"k{n}", "mail_id": n, "mailbox_id": self.ids["bob_box"],
                 "gone_at": now - listing.GONE_KEEP + n} for n in range(0, 2)])

        await self.db.run("gone", txn)
        self.patch(mail_module, "GONE_SWEEP_BATCH", 2)
        runs: list[str] = []
        run = self.db.run

        def counted(name: str, *args: Any, **kwargs: Any) -> Any:
            runs.append(name)
            return run(name, *args, **kwargs)

        self.patch(self.db, "run", counted)
        sweeper = GoneSweeper(self.mail, every=60)
        sweeper.startService()  # sweeps at start
        await sweeper.stopService()
        self.assertEqual(runs, ["mailapi_gone_sweep"] * 3)  # 2 + 2 + 1
        self.assertEqual(await self.gone_rows(), ["k0", "k1"])

    async def test_no_readable_mailbox_lists_nothing(self) -> None:
        def txn(conn: Connection) -> int:
            return thd_make_user(conn, "ann")

        ann = await self.db.run("ann", txn)
        self.ids["ann"] = ann
        await self.add("bob_box", range(1, 3))
        await self.grant("bob_box", "ann", allow_send=True)
        self.assertEqual(await self.subjects("ann", 10), ([], 0, None, None))


class SQLiteListingTests(ListingTestsMixin, TestCase):
    backend = "sqlite"


class PostgreSQLListingTests(ListingTestsMixin, TestCase):
    backend = "postgresql"

    async def test_a_mailboxs_part_of_a_page_is_read_down_its_index_in_a_generic_plan(
        self,
    ) -> None:
        """A prepared statement run often gets a generic plan, which knows neither the
        mailbox nor where the page starts. Each mailbox's part of a page (and of the page
        before it) must still walk that mailbox's (mailbox_id, id) index: a walk down the
        primary key, testing each row, read 300,000 rows for a user whose mail is old."""
        def txn(conn: Connection) -> list[list[str]]:
            conn.exec_driver_sql(
                "INSERT INTO mailapi_mail (public_id, mailbox_id, status, read, created_at) "
                f"SELECT 'x' || g, CASE WHEN mod(g, 1000) = 0 THEN {self.ids['bob_box']} ELSE "
                f"{self.ids['joe_box']} END, 'inbox', false, g FROM generate_series(1, 20000) g")
            conn.exec_driver_sql("ANALYZE mailapi_mail")
            conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            dialect = postgresql.psycopg.dialect(paramstyle="numeric_dollar")  # type: ignore[attr-defined]
            plans = []
            values = {"box": self.ids["bob_box"], "start": 10000, "n": 26}
            for name, statement in (("page", listing._ROWS["postgresql"].statement),
                                    ("before", listing._AFTER["postgresql"].statement)):
                compiled = statement.compile(dialect=dialect)
                binds = [compiled.binds[key] for key in compiled.positiontup or ()]
                args = ", ".join(str(values.get(b.key, b.effective_value)) for b in binds)
                conn.exec_driver_sql(f"PREPARE {name} AS {compiled}")
                plans.append([row[0] for row in conn.exec_driver_sql(
                    f"EXPLAIN EXECUTE {name} ({args})")])
                conn.exec_driver_sql(f"DEALLOCATE {name}")
            return plans

        page, before = await self.db.run("plans", txn)
        self.assertIn("Index Scan Backward using ix_mailapi_mail_mailbox_id on mailapi_mail",
                      " ".join(page), page)
        self.assertIn("Index Scan using ix_mailapi_mail_mailbox_id on mailapi_mail",
                      " ".join(before), before)
        for plan in (page, before):
            self.assertNotIn("pk_mailapi_mail", " ".join(plan), plan)
