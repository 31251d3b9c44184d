"""Mail API mailboxes and the lifecycle of their domain: a mailbox belongs to the domain row it
was created under (`mailboxes.domain_id`). Once that domain is removed, nothing is delivered
to the mailbox or sent from it, for good: a new row of the same name (another user's claim,
or the same owner's) does not make it live again. Its mail stays readable.

Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, event, func, select
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.gateway.domains import DomainService
from mailcore.mailapi import MailApiError, MailboxService
from mailcore.mailapi.counts import mail_size
from mailcore.mailapi.delivery import HostedAddresses, LocalMailboxes
from mailcore.mailapi.errors import CONFLICT
from mailcore.mailapi.files import MailFiles
from mailcore.mailapi.mail import Edit, MailService, Outcome
from mailcore.mailapi.outbox import thd_outbox
from mailcore.store import Database
from mailcore.store.schema import mailapi_mail, mailboxes
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user

BOB = "bob@x.test"
MESSAGE = b"From: s@far.test\r\nTo: bob@x.test\r\nSubject: for bob\r\n\r\nhello\r\n"


class World:
    """The services of one node over one store, and users alice and carol."""

    def __init__(self, test: TestCase, db: Database) -> None:
        self.db = db
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.hosted = HostedAddresses(db, self.clock)
        self.domains = DomainService(db, self.clock)
        self.boxes = MailboxService(db, self.clock, on_change=self.hosted.invalidate)
        files = MailFiles(Path(test.mktemp()))
        files.prepare()
        self.mail = MailService(db, self.clock, "mx.test", files, CpuPool.for_tests())
        self.local = LocalMailboxes(files, CpuPool.for_tests())
        self.rcpt = 0

    async def users(self) -> tuple[int, int]:
        alice = await self.db.run("alice", thd_make_user, "alice")
        carol = await self.db.run("carol", thd_make_user, "carol")
        return alice, carol

    async def deliver(self, address: str) -> bool:
        """Store MESSAGE for `address` as the queue's local delivery does; whether it was."""
        self.rcpt += 1
        rcpt, prepared = self.rcpt, await self.local.prepare("Q", MESSAGE)
        stored, _full, _waiting = await self.db.run("deliver", lambda conn: self.local.thd_store(
            conn, [(rcpt, address)], f"Q{rcpt}", prepared, self.clock.seconds()))
        return rcpt in stored

    async def send(self, user: int, **values: str) -> Outcome:
        written = await self.mail.create(user, "", Edit("outbox", {
            "from": BOB, "to": "x@far.test", "subject": "hi", **values}))
        return written.outcome

    async def mail_count(self, box_id: int) -> int:
        return int(await self.db.read("count", lambda conn: conn.execute(
            select(func.count()).select_from(mailapi_mail)
            .where(mailapi_mail.c.mailbox_id == box_id)).scalar_one()))


class DomainRemovalMixin(DatabaseMixin):
    async def world(self) -> tuple[World, int, int, int]:
        """alice's served domain x.test with her mailbox bob@x.test holding one inbox mail;
        the world, alice, carol and the mailbox's id."""
        w = World(self, await self.open_database())
        alice, carol = await w.users()
        await w.domains.add("x.test", alice, "", hosted=True)
        box = await w.boxes.add(BOB, alice)
        self.assertTrue(await w.hosted.contains(BOB))
        self.assertTrue(await w.deliver(BOB))
        self.assertEqual(await w.mail_count(box.id), 1)
        return w, alice, carol, box.id

    async def test_a_domain_claimed_again_does_not_revive_the_old_owners_mailbox(
            self) -> None:
        # Found last session: removing alice's domain left her mailbox, and once carol
        # claimed the name (served) mail to bob@x.test went into alice's mailbox again
        # and alice sent as carol's domain.
        w, alice, carol, old = await self.world()
        await w.domains.remove("x.test", owner_id=alice)
        await w.domains.add("x.test", carol, "mx.carol.test")
        await w.domains.refresh()
        w.clock.advance(60)  # past the hosted addresses' time to live
        # Routed to carol's server, not into alice's mailbox; stored there by nothing.
        self.assertFalse(await w.hosted.contains(BOB))
        self.assertFalse(await w.deliver(BOB))
        self.assertEqual(await w.mail_count(old), 1)
        # alice's mailbox sends nothing as carol's domain: the mail stays a draft.
        self.assertEqual(await w.send(alice), Outcome.UNAUTHORIZED)
        # Her mail stays hers to read, in a mailbox shown inactive.
        [access] = await w.boxes.visible(alice)
        self.assertEqual((access.mailbox.address, access.mailbox.active), (BOB, False))

    async def test_an_inactive_mailbox_is_no_reply_to_either(self) -> None:
        # alice, sending from her other domain's mailbox, could still name bob@x.test as
        # the reply-to: the replies went to x.test's new owner.
        w, alice, carol, _ = await self.world()
        await w.domains.add("y.test", alice, "", hosted=True)
        await w.boxes.add("alice@y.test", alice)
        reply_to_bob = {"from": "alice@y.test", "reply-to": BOB}
        await w.domains.remove("x.test", owner_id=alice)
        await w.domains.add("x.test", carol, "mx.carol.test")
        self.assertEqual(await w.send(alice, **reply_to_bob), Outcome.UNAUTHORIZED)
        self.assertEqual(await w.send(alice, **{"from": "alice@y.test"}), Outcome.ENQUEUED)

    async def test_the_default_from_is_a_mailbox_still_served(self) -> None:
        # alice's mailboxes: bob@x.test (its domain removed) and zed@z.test. A mail posted
        # without `from` took the first by address, the inactive one, and stayed a draft
        # "unauthorized from" though she has a mailbox to send it from.
        w, alice, _, _ = await self.world()
        await w.domains.add("z.test", alice, "", hosted=True)
        await w.boxes.add("zed@z.test", alice)
        await w.domains.remove("x.test", owner_id=alice)
        for user_email in ("", BOB):  # also when her own address is the inactive mailbox
            written = await w.mail.create(alice, user_email, Edit("outbox", {
                "to": "x@far.test", "subject": "hi"}))
            self.assertEqual(written.outcome, Outcome.ENQUEUED)
        self.assertEqual(await w.db.read("froms", lambda conn: conn.execute(
            select(mailapi_mail.c.mail_from).where(mailapi_mail.c.status == "outbox"))
            .scalars().all()), ["zed@z.test", "zed@z.test"])
        # A draft without `from` is kept in (and written from) the live mailbox too.
        draft = await w.mail.create(alice, BOB, Edit("draft", {"to": "x@far.test"}))
        mail = await w.mail.get(alice, draft.public_id)
        self.assertEqual((mail.mailbox, mail.fields["from"]), ("zed@z.test", "zed@z.test"))
        # With no live mailbox left, the default is still hers (a draft, unauthorized).
        await w.domains.remove("z.test", owner_id=alice)
        self.assertEqual(await w.send(alice, **{"from": ""}), Outcome.UNAUTHORIZED)

    async def test_the_same_owner_claiming_the_name_again_gets_another_domain(self) -> None:
        w, alice, _, old = await self.world()
        await w.domains.remove("x.test", owner_id=alice)
        await w.domains.add("x.test", alice, "", hosted=True)
        await w.domains.refresh()
        w.clock.advance(60)
        self.assertFalse(await w.hosted.contains(BOB))
        self.assertFalse(w.domains.accepts("bob", "x.test"))  # RCPT: 550
        self.assertFalse(await w.deliver(BOB))
        self.assertEqual(await w.mail_count(old), 1)
        self.assertEqual(await w.send(alice), Outcome.UNAUTHORIZED)

    async def test_the_new_owner_has_the_address_once_the_old_mailbox_is_removed(
            self) -> None:
        w, alice, carol, _ = await self.world()
        await w.domains.remove("x.test", owner_id=alice)
        await w.domains.add("x.test", carol, "", hosted=True)
        # The address is still alice's mailbox (with her mail): the operator decides.
        with self.assertRaises(MailApiError) as refused:
            await w.boxes.add(BOB, carol)
        self.assertEqual(refused.exception.kind, CONFLICT)
        self.assertIn("from when its domain was removed", refused.exception.message)
        await w.boxes.remove(BOB)
        fresh = await w.boxes.add(BOB, carol)
        await w.domains.refresh()
        self.assertTrue(fresh.active)
        self.assertTrue(await w.hosted.contains(BOB))
        self.assertTrue(w.domains.accepts("bob", "x.test"))
        self.assertTrue(await w.deliver(BOB))
        self.assertEqual(await w.mail_count(fresh.id), 1)
        self.assertEqual(await w.send(carol), Outcome.ENQUEUED)
        with self.assertRaises(MailApiError):  # not hers: she has no mailbox left
            await w.send(alice)

    async def test_outbox_mail_of_a_removed_domain_goes_back_to_the_drafts(self) -> None:
        # Mail answered 202 and not yet handed to the queue would have gone out as a domain
        # nobody serves (or someone else's, once claimed again).
        w, alice, carol, old = await self.world()
        inbox = await w.db.read("used", lambda conn: conn.execute(
            select(mailboxes.c.used_bytes)).scalar_one())
        self.assertEqual(await w.send(alice), Outcome.ENQUEUED)
        self.assertEqual(len(await w.db.read("outbox", thd_outbox, 10)), 1)
        await w.domains.remove("x.test", owner_id=alice)
        await w.domains.add("x.test", carol, "mx.carol.test")
        self.assertEqual(await w.db.read("outbox", thd_outbox, 10), [])

        def statuses(conn: Connection) -> list[tuple[str, object, object]]:
            return [tuple(r) for r in conn.execute(
                select(mailapi_mail.c.status, mailapi_mail.c.queue_id, mailapi_mail.c.raw)
                .where(mailapi_mail.c.status != "inbox"))]

        self.assertEqual(await w.db.read("statuses", statuses), [("draft", None, None)])
        # The message dropped gives its bytes back (mailboxes.used_bytes, migration 0049):
        # the draft takes its fields, as before it was sent.
        used, draft = await w.db.read("used", lambda conn: (
            conn.execute(select(mailboxes.c.used_bytes).where(mailboxes.c.id == old))
            .scalar_one(),
            conn.execute(select(mailapi_mail.c.size)
                         .where(mailapi_mail.c.status == "draft")).scalar_one()))
        self.assertEqual(draft, mail_size([BOB, "x@far.test", "hi"]))
        self.assertEqual(used, inbox + draft)
        # The owner deletes the inactive mailbox (nothing waits in its outbox).
        await w.boxes.delete(alice, BOB)
        self.assertIsNone(await w.db.read("box", lambda conn: conn.execute(
            select(mailboxes.c.id).where(mailboxes.c.id == old)).first()))


class PostgresRemovalDuringASendTests(DatabaseMixin, TestCase):
    """A domain removed while a send from one of its mailboxes is under way (PostgreSQL;
    SQLite's writers take turns)."""

    backend = "postgresql"

    async def test_mail_put_in_the_outbox_meanwhile_goes_back_to_the_drafts(self) -> None:
        # The send found the domain served and put its mail in the outbox after the
        # removal had sent the outbox back to the drafts: the mail stayed in the outbox of
        # an inactive mailbox, never sent and keeping the owner from deleting it.
        w = World(self, await self.open_database())
        alice, _ = await w.users()
        await w.domains.add("x.test", alice, "", hosted=True)
        await w.boxes.add(BOB, alice)
        removed = threading.Event()
        fired = False

        def remove_meanwhile(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            # Once the send has read its mailbox's domain: the owner removes the domain
            # (another request), given two seconds to commit.
            nonlocal fired
            if fired or "mailboxes.domain_id = domains.id" not in statement:
                return
            fired = True

            def remove() -> None:
                done = Deferred.fromCoroutine(w.domains.remove("x.test", owner_id=alice))
                done.addBoth(lambda _: removed.set())

            reactor.callFromThread(remove)  # type: ignore[attr-defined]
            removed.wait(2.0)

        event.listen(w.db.engine, "after_cursor_execute", remove_meanwhile)
        try:
            self.assertEqual(await w.send(alice), Outcome.ENQUEUED)
        finally:
            event.remove(w.db.engine, "after_cursor_execute", remove_meanwhile)
        await threads.deferToThread(removed.wait, 30.0)
        self.assertTrue(fired and removed.is_set())
        self.assertEqual(await w.db.read("outbox", thd_outbox, 10), [])
        self.assertEqual(await w.db.read("statuses", lambda conn: conn.execute(
            select(mailapi_mail.c.status)).scalars().all()), ["draft"])
        await w.boxes.delete(alice, BOB)  # nothing waits in its outbox


class SQLiteDomainRemovalTests(DomainRemovalMixin, TestCase):
    backend = "sqlite"


class PostgresDomainRemovalTests(DomainRemovalMixin, TestCase):
    backend = "postgresql"
