"""Local delivery: queued mail for a hosted mailbox is stored in it as unread inbox mail,
exactly once, while the message's other recipients are relayed as before; the message and
its attachments are files on disk, one each however many recipients hold them."""

from __future__ import annotations

import base64
import tracemalloc
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, event, func, select, update
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailcore.mailapi import MailboxService
from mailcore.mailapi.delivery import HOSTED_TTL, HostedAddresses, LocalMailboxes
from mailcore.mailapi.files import MailFiles
from mailcore.queue.model import Job, Rcpt, thd_delete
from mailcore.queue.runner import thd_deliver_local
from mailcore.store.schema import (
    domains,
    mailapi_attachments,
    mailapi_mail,
    mailboxes,
    queue_recipients,
    users,
)
from mailcore.workers import CpuPool
from tests.support.mailsink import done, envelope, thd_add_domain
from tests.support.queuetest import QueueTestCase

MIME = (
    b"From: Joe <joe@x.test>\r\nTo: bob@customer.test\r\nSubject: =?utf-8?q?h=C3=A9llo?=\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHi Bob\r\n"
    b"--B\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; "
    b"filename=\"a.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--B--\r\n"
)


def local_mailboxes(root: str) -> LocalMailboxes:
    files = MailFiles(Path(root))
    files.prepare()
    return LocalMailboxes(files, CpuPool.for_tests())


def thd_rows(conn: Connection) -> list[Any]:
    return list(conn.execute(select(mailapi_mail).order_by(mailapi_mail.c.id)))


class LocalDeliveryTests(QueueTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.hosted = HostedAddresses(self.db, self.clock)
        self.runner.router.local = self.hosted
        self.local = local_mailboxes(self.mktemp())
        self.runner.local_store = self.local
        self.mailboxes = MailboxService(self.db, self.clock, on_change=self.hosted.invalidate)
        owner = done(self.db.read("owner", lambda c: c.execute(select(users.c.id)).scalar()))
        done(defer.Deferred.fromCoroutine(self.mailboxes.add("bob@customer.test", owner)))

    def mail(self) -> list[Any]:
        return list(done(self.db.read("rows", thd_rows)))

    async def test_a_hosted_recipient_is_stored_and_the_others_relayed(self) -> None:
        await self.accept("Q1", "Bob@customer.test", "joe@customer.test", body=MIME)
        self.assertEqual(self.connector.addresses(), ["joe@customer.test"])
        [row] = self.mail()
        self.assertEqual((row.status, row.read, row.subject, row.body, row.mail_from),
                         ("inbox", False, "héllo", "Hi Bob", "Joe <joe@x.test>"))
        self.assertIsNone(row.raw)
        self.assertEqual(self.local.files.read(row.raw_sha256), MIME)
        self.assertRegex(row.public_id, r"^[0-9a-f]{7}$")
        attachments = done(self.db.read("att", lambda c: list(c.execute(
            select(mailapi_attachments.c.name, mailapi_attachments.c.content_type,
                   mailapi_attachments.c.data, mailapi_attachments.c.sha256)))))
        self.assertEqual([tuple(a)[:3] for a in attachments],
                         [("a.pdf", "application/pdf", None)])
        self.assertEqual(self.local.files.read(attachments[0].sha256), b"%PDF-")
        await self.q.spool.drain()
        r = queue_recipients.c
        states = done(self.db.read("states", lambda c: sorted(
            tuple(row) for row in c.execute(select(r.address, r.state, r.next_hop)))))
        self.assertEqual(states, [("Bob@customer.test", "delivered", "local"),
                                  ("joe@customer.test", "delivered", "10.0.0.1:2525")])

    async def test_several_recipients_share_one_copy_of_the_message_and_attachments(
            self) -> None:
        done(defer.Deferred.fromCoroutine(self.mailboxes.add(
            "joe@customer.test", done(self.db.read("owner", lambda c: c.execute(
                select(users.c.id)).scalar())))))
        await self.accept("Q1", "bob@customer.test", "joe@customer.test", body=MIME)
        rows = self.mail()
        self.assertEqual(len(rows), 2)
        self.assertEqual(len({r.raw_sha256 for r in rows}), 1)
        hashes = done(self.db.read("att", lambda c: [r[0] for r in c.execute(
            select(mailapi_attachments.c.sha256))]))
        self.assertEqual((len(hashes), len(set(hashes))), (2, 1))
        self.assertEqual(len(self.local.files.hashes()), 2)  # the message, its attachment

    async def test_local_parts_differing_in_case_are_stored_once(self) -> None:
        await self.accept("Q1", "Bob@customer.test", "bob@customer.test", body=MIME)
        self.assertEqual(len(self.mail()), 1)
        await self.q.spool.drain()
        r = queue_recipients.c
        states = done(self.db.read("states", lambda c: sorted(
            tuple(row) for row in c.execute(select(r.address, r.state)))))
        self.assertEqual(states, [("Bob@customer.test", "delivered"),
                                  ("bob@customer.test", "delivered")])
        # replayed, the recipient without a row of its own is still the mailbox's copy
        ids = done(self.db.read("ids", lambda c: [tuple(row) for row in c.execute(
            select(r.id, r.address).order_by(r.id.desc()))]))
        job = Job("Q1", "a@x.test", "relay", 0.0, 10,
                  [Rcpt(i, address, self.domain, 0) for i, address in ids])
        prepared = await self.local.prepare("Q1", b"Subject: again\r\n\r\nx")
        stored, _results, _dsns = await self.q.spool.run_serialized(
            "replay", thd_deliver_local, self.local, job, prepared,
            "node", 1.0, 2.0, "mx.test")
        self.assertEqual(stored.stored, {i for i, _ in ids})
        self.assertEqual(len(self.mail()), 1)

    async def test_a_replayed_delivery_stores_nothing_twice(self) -> None:
        await self.accept("Q1", "bob@customer.test")
        [row] = self.mail()
        job = Job("Q1", "a@x.test", "relay", 0.0, 10,
                  [Rcpt(row.queue_rcpt_id, "bob@customer.test", self.domain, 0)])
        prepared = await self.local.prepare("Q1", b"Subject: again\r\n\r\nx")
        stored, _results, _dsns = await self.q.spool.run_serialized(
            "replay", thd_deliver_local, self.local, job, prepared,
            "node", 1.0, 2.0, "mx.test")
        self.assertEqual(stored.stored, {row.queue_rcpt_id})
        self.assertEqual(len(self.mail()), 1)

    async def test_a_new_recipient_is_not_taken_for_a_forgotten_one_stored(self) -> None:
        """A delivered message forgotten by the queue (pruned, or `queue delete`) leaves its
        recipient's id on the mail it stored: the next recipient made must not get it, or
        its mail is taken for stored already (SQLite AUTOINCREMENT, migration 0069)."""
        await self.accept("Q1", "bob@customer.test")
        await self.q.spool.drain()
        self.assertTrue(done(self.db.run("forget", thd_delete, "Q1")))
        await self.accept("Q2", "bob@customer.test", body=MIME)
        self.assertEqual([row.subject for row in self.mail()], ["hello", "héllo"])

    async def test_a_mailbox_removed_before_delivery_bounces_to_the_sender(self) -> None:
        # The router still believes the address hosted (its cache), the store does not.
        self.assertTrue(await self.hosted.contains("bob@customer.test"))
        done(self.db.run("rm", lambda c: c.execute(mailboxes.delete())))
        await self.accept("Q1", "bob@customer.test", sender="sender@elsewhere.test")
        await self.q.spool.drain()
        self.assertEqual(self.mail(), [])
        count = done(self.db.read("n", lambda c: c.execute(
            select(func.count()).select_from(queue_recipients)
            .where(queue_recipients.c.state == "bounced")).scalar()))
        self.assertEqual(count, 1)

    async def test_mail_for_a_full_mailbox_bounces_5_2_2_and_stores_nothing(self) -> None:
        # [mailapi] mailbox_quota_bytes: the mailbox had no limit (anyone mailing it could
        # fill the disk). The first message fits; the second would pass the quota and
        # bounces permanently, as Dovecot's default; its neighbour recipient is relayed.
        self.local.quota_bytes = len(MIME) + 100
        await self.accept("Q1", "bob@customer.test", body=MIME)
        await self.q.spool.drain()
        [first] = self.mail()
        used = done(self.db.read("used", lambda c: c.execute(
            select(mailboxes.c.used_bytes)).scalar_one()))
        self.assertEqual(used, first.size)
        # the message as received, its attachment (5 bytes) and its text fields
        self.assertEqual(first.size, len(MIME) + 5 + len("Joe <joe@x.test>héllo".encode())
                         + len("bob@customer.test") + len("Hi Bob"))
        await self.accept("Q2", "bob@customer.test", "joe@customer.test", body=MIME,
                          sender="sender@elsewhere.test")
        await self.q.spool.drain()
        self.assertEqual(len(self.mail()), 1)
        r = queue_recipients.c
        states = done(self.db.read("states", lambda c: sorted(
            tuple(row) for row in c.execute(select(r.address, r.state, r.last_error)
                                            .where(r.message_id == "Q2")))))
        self.assertEqual(states[0][:2], ("bob@customer.test", "bounced"))
        self.assertIn("5.2.2 mailbox full", states[0][2])
        self.assertEqual(states[1][:2], ("joe@customer.test", "delivered"))

    async def test_mail_for_a_suspended_domain_waits_in_the_queue(self) -> None:
        # The domain's owner is disabled (`mailcore user disable`): the SMTP server answers
        # its recipients 450 4.2.1, so mail from outside waits with its sender. Mail that
        # reaches the queue another way (a hosted mailbox's outbox, a bounce, mail accepted
        # before the owner was disabled) was stored in the mailbox all the same; it now
        # waits in the queue, deferred 4.2.1, and is stored once the owner is enabled.
        done(self.db.run("disable", lambda c: c.execute(
            update(users).where(users.c.id == select(domains.c.owner_id).scalar_subquery())
            .values(is_active=False))))
        await self.accept("Q1", "bob@customer.test", "joe@customer.test",
                          sender="sender@elsewhere.test")
        await self.q.spool.drain()
        self.assertEqual(self.mail(), [])
        self.assertEqual(self.connector.addresses(), ["joe@customer.test"])
        r = queue_recipients.c
        [(state, error)] = done(self.db.read("states", lambda c: [tuple(row) for row in c.execute(
            select(r.state, r.last_error).where(r.address == "bob@customer.test"))]))
        self.assertEqual(state, "deferred")
        self.assertIn("4.2.1", error)
        done(self.db.run("enable", lambda c: c.execute(update(users).values(is_active=True))))
        self.clock.advance(3600)
        await self.q.spool.drain()
        [row] = self.mail()
        self.assertEqual(row.status, "inbox")

    async def test_a_bounce_comes_back_to_the_senders_inbox_as_a_dsn(self) -> None:
        self.connector.replies["joe@customer.test"] = (550, ("5.1.1 <joe@customer.test>: no",))
        await self.accept("Q1", "joe@customer.test", sender="bob@customer.test")
        await self.q.spool.drain()
        [dsn] = self.mail()
        self.assertEqual((dsn.status, dsn.read), ("inbox", False))
        raw = self.local.files.read(dsn.raw_sha256)
        self.assertIn(b"report-type=delivery-status", raw)
        self.assertIn(b"joe@customer.test", raw)


class HostedDomainTests(QueueTestCase):
    """A hosted domain (`domain add --local`) has no next hop: its mailboxes keep their mail,
    its other addresses bounce."""

    def setUp(self) -> None:
        super().setUp()
        self.hosted_domain = done(self.db.run("add", thd_add_domain, "hosted.test", "", 25))
        hosted = HostedAddresses(self.db, self.clock)
        self.runner.router.local = hosted
        self.runner.local_store = local_mailboxes(self.mktemp())
        boxes = MailboxService(self.db, self.clock, on_change=hosted.invalidate)
        owner = done(self.db.read("owner", lambda c: c.execute(select(users.c.id)).scalar()))
        done(defer.Deferred.fromCoroutine(boxes.add("bob@hosted.test", owner)))

    async def test_mailbox_kept_other_addresses_bounce_without_a_connection(self) -> None:
        env = envelope("a@x.test", ("bob@hosted.test", self.hosted_domain),
                       ("nobody@hosted.test", self.hosted_domain))
        await self.q.spool.accept("Q1", env, b"Subject: s\r\n\r\nb\r\n")
        await self.q.spool.drain()
        # Only the DSN to the sender went out (to the relayhost); nothing to hosted.test.
        self.assertEqual([h.host for h in self.connector.connects], ["relay.test"])
        r = queue_recipients.c
        states = done(self.db.read("states", lambda c: sorted(
            tuple(row) for row in c.execute(select(r.address, r.state, r.last_error)
                                            .where(r.message_id == "Q1")))))
        self.assertEqual(states[0][:2], ("bob@hosted.test", "delivered"))
        self.assertEqual(states[1][:2], ("nobody@hosted.test", "bounced"))
        self.assertIn("5.1.2 no such mailbox here", states[1][2])
        rows = done(self.db.read("rows", thd_rows))
        self.assertEqual(len(rows), 1)


class StorableTextTests(SynchronousTestCase):
    def test_nul_and_lone_surrogates_are_replaced_not_refused(self) -> None:
        """A delivered message with NUL in its subject, body or a file name is stored with
        U+FFFD there (PostgreSQL's text refuses NUL), never refused or lost."""
        from mailcore.mailapi.mime import parse_message

        raw = (b"From: a@x.test\r\nTo: b@y.test\r\nSubject: =?utf-8?q?hi=00there?=\r\n"
               b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
               b"--B\r\nContent-Type: text/plain\r\n\r\nzebra\x00crossing\r\n"
               b"--B\r\nContent-Type: application/octet-stream\r\n"
               b"Content-Disposition: attachment; filename*=utf-8''f%00.bin\r\n\r\nxx\r\n"
               b"--B--\r\n")
        parsed = parse_message(raw)
        self.assertEqual(parsed.subject, "hi\ufffdthere")
        self.assertEqual(parsed.body.strip(), "zebra\ufffdcrossing")
        self.assertEqual([a.name for a in parsed.attachments], ["f\ufffd.bin"])


class LargeMessageTests(SynchronousTestCase):
    def test_a_large_attachment_goes_to_its_file_without_copies_of_the_message(self) -> None:
        """Preparing a message with a large attachment holds about a slice of it besides
        the message: the email package's copies of a 53 MB message took 411 MB, so that
        a few at once could take a small node's memory."""
        data = bytes(range(256)) * (6 * 4096)  # 6 MiB, 8 MiB as base64
        raw = MIME.replace(b"JVBERi0=\r\n", base64.encodebytes(data).replace(b"\n", b"\r\n"))
        box = local_mailboxes(self.mktemp())
        tracemalloc.start()
        try:
            prepared = box.thd_prepare(raw)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 2 << 20)  # 63 MiB before
        [stored] = prepared.attachments
        self.assertEqual((stored.name, stored.size), ("a.pdf", len(data)))
        self.assertEqual(box.files.read(stored.sha256), data)
        self.assertEqual(box.files.read(prepared.raw.sha256), raw)
        self.assertEqual(prepared.parsed.body, "Hi Bob")


class HostedAddressesReloadTests(TestCase):
    async def test_callers_waiting_for_a_reload_share_one(self) -> None:
        """The queue routes the recipients of MX-routed messages all at once: when the
        cached set has expired, they wait for one reload, not one each."""
        from tests.support.db import open_database
        from tests.support.reactor import get_reactor

        db = await open_database(self, "sqlite")
        statements: list[str] = []
        event.listen(db.engine, "before_cursor_execute",
                     lambda _c, _cur, statement, *_a: statements.append(statement))
        hosted = HostedAddresses(db, get_reactor())
        answers = await defer.gatherResults([
            defer.Deferred.fromCoroutine(hosted.contains(f"u{i}@x.test")) for i in range(20)
        ])
        self.assertEqual(answers, [False] * 20)
        self.assertEqual(len([s for s in statements if "FROM mailboxes" in s]), 1)

    async def test_a_change_during_a_reload_is_not_hidden_by_it(self) -> None:
        """A mailbox added through this process while a reload is under way is seen by
        the next caller: the reload read before the change, so its answer is not cached
        for the TTL."""
        from tests.support.db import open_database
        from tests.support.reactor import get_reactor

        db = await open_database(self, "sqlite")
        await db.run("add", thd_add_domain, "hosted.test", "", 25)
        hosted = HostedAddresses(db, get_reactor())
        boxes = MailboxService(db, get_reactor(), on_change=hosted.invalidate)
        owner: int = await db.read("owner", lambda c: c.execute(select(users.c.id)).scalar_one())
        # The reload's read is done (before the mailbox exists); its answer is held back
        # until the mailbox has been added.
        read_done: defer.Deferred[None] = defer.Deferred()
        gate: defer.Deferred[None] = defer.Deferred()
        real_read = db.read

        def held_read(name: str, fn: Any) -> defer.Deferred[Any]:
            async def held() -> Any:
                answer = await real_read(name, fn)
                read_done.callback(None)
                await gate
                return answer
            return defer.Deferred.fromCoroutine(held())

        db.read = held_read  # type: ignore[method-assign,assignment]
        reading = defer.Deferred.fromCoroutine(hosted.contains("bob@hosted.test"))
        await read_done
        db.read = real_read  # type: ignore[method-assign]
        await boxes.add("bob@hosted.test", owner)
        gate.callback(None)
        self.assertFalse(await reading)  # asked before the mailbox existed
        self.assertTrue(await hosted.contains("bob@hosted.test"))

    async def test_an_empty_set_is_cached_too(self) -> None:
        """No hosted mailbox at all is an answer like any other: cached for the TTL."""
        from tests.support.db import open_database

        clock = Clock()
        db = await open_database(self, "sqlite")
        statements: list[str] = []
        event.listen(db.engine, "before_cursor_execute",
                     lambda _c, _cur, statement, *_a: statements.append(statement))
        hosted = HostedAddresses(db, clock)
        for _ in range(3):
            self.assertFalse(await hosted.contains("x@y.test"))
        self.assertEqual(len([s for s in statements if "FROM mailboxes" in s]), 1)
        clock.advance(HOSTED_TTL)
        self.assertFalse(await hosted.contains("x@y.test"))
        self.assertEqual(len([s for s in statements if "FROM mailboxes" in s]), 2)

    async def test_mailboxes_of_a_domain_no_longer_served_are_not_hosted(self) -> None:
        """Removing a domain leaves its mailboxes: mail to them must not be stored there
        any more (nor once another user claims the name and has not proved it)."""
        from tests.support.db import open_database

        db = await open_database(self, "sqlite")
        await db.run("add", thd_add_domain, "hosted.test", "", 25)
        clock = Clock()
        hosted = HostedAddresses(db, clock)
        boxes = MailboxService(db, clock, on_change=hosted.invalidate)
        owner: int = await db.read("owner", lambda c: c.execute(select(users.c.id)).scalar_one())
        await boxes.add("bob@hosted.test", owner)
        self.assertTrue(await hosted.contains("bob@hosted.test"))
        await db.run("remove", lambda c: c.execute(
            delete(domains).where(domains.c.name == "hosted.test")))
        clock.advance(HOSTED_TTL)
        self.assertFalse(await hosted.contains("bob@hosted.test"))
        # Claimed again by someone, the claim waiting for its DNS proof: not served either.
        domain_id = await db.run("claim", thd_add_domain, "hosted.test", "mx.other.test", 25)
        await db.run("pending", lambda c: c.execute(
            update(domains).where(domains.c.id == domain_id).values(verify_token="t")))
        clock.advance(HOSTED_TTL)
        self.assertFalse(await hosted.contains("bob@hosted.test"))

