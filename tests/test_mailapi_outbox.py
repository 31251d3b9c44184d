"""The outbox on a Clock: a mailbox's next message is handed to the queue once the queue has
tried the one before it, woken when the queue records the try or commits its results (no
polling of the store), in posting order; each mailbox in a stream of its own."""

from __future__ import annotations

import datetime
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update
from twisted.internet import defer
from twisted.logger import LogLevel, capturedLogs, formatEvent

from mailcore.mailapi import MailApiError, MailboxService, outbox
from mailcore.mailapi.errors import CONFLICT, QUOTA
from mailcore.mailapi.files import MailFiles
from mailcore.mailapi.mail import Edit, MailService, Outcome
from mailcore.mailapi.outbox import FIFO_POLL, RETRY_AFTER, OutboxSender, thd_outbox
from mailcore.store.schema import domains, mailapi_mail, queue_messages, queue_recipients, users
from mailcore.workers import CpuPool
from tests.support.logs import load_noise
from tests.support.mailsink import done, thd_add_domain
from tests.support.queuetest import QueueTestCase

BOB = "bob@customer.test"
JOE = "joe@customer.test"


class OutboxWakeUpTests(QueueTestCase):
    def setUp(self) -> None:
        super().setUp()
        owner = done(self.db.read("owner", lambda c: c.execute(select(users.c.id)).scalar()))
        self.owner = owner
        done(defer.Deferred.fromCoroutine(
            MailboxService(self.db, self.clock).add(BOB, owner)))
        self.mail = MailService(self.db, self.clock, "mx.test",
                                MailFiles(Path(self.mktemp())), CpuPool.for_tests())
        self.sender = OutboxSender(self.db, self.clock, self.q.spool)
        self.addCleanup(self.sender.stopService)

    def queued(self) -> int:
        return int(done(self.db.read("n", lambda c: c.execute(
            select(func.count()).select_from(queue_messages)).scalar_one())))

    async def test_the_next_message_goes_when_the_previous_ones_results_commit(self) -> None:
        for n in range(3):
            written = await self.mail.create(self.owner, BOB, Edit("outbox", {
                "to": f"r{n}@customer.test", "subject": f"n{n}"}))
            self.assertEqual(written.outcome, Outcome.ENQUEUED)
        self.connector.hold = defer.Deferred()  # the next hop has not answered yet
        self.sender.startService()
        self.assertEqual(self.queued(), 1)  # the second waits for the first's try
        # Still waiting, with only the slow look for other nodes' results on the clock.
        calls = [c.getTime() - self.clock.seconds() for c in self.clock.getDelayedCalls()]
        self.assertIn(FIFO_POLL, calls)
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        # No time passes: each try wakes the sender for the next message.
        self.assertEqual(self.queued(), 3)
        self.assertEqual(self.connector.addresses(),
                         ["r0@customer.test", "r1@customer.test", "r2@customer.test"])

    async def test_a_mail_the_spool_leased_here_is_waited_on_without_reading_the_store(
            self) -> None:
        # Stored leased to this node's runner, it is untried until the runner tries it and
        # records that: the sender read the store for it every time all the same.
        reads: list[str] = []
        untried = outbox.thd_untried

        def counted(conn: Any, queue_id: str) -> bool:
            reads.append(queue_id)
            return untried(conn, queue_id)

        self.patch(outbox, "thd_untried", counted)
        for n in range(3):
            await self.mail.create(self.owner, BOB, Edit("outbox", {
                "to": f"r{n}@customer.test", "subject": f"n{n}"}))
        self.connector.hold = defer.Deferred()  # the next hop has not answered yet
        self.sender.startService()
        self.assertEqual((self.queued(), reads), (1, []))
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        await self.sender.settled()
        self.assertEqual(self.connector.addresses(),
                         ["r0@customer.test", "r1@customer.test", "r2@customer.test"])
        # Only a wake by results committed meanwhile (another mail's) looks at the store.
        self.assertLess(len(reads), 3)

    async def test_a_draft_is_sent_in_its_turn_from_when_it_entered_the_outbox(self) -> None:
        # Seed 002: the outbox is first in, first out. The draft was written first, but
        # entered the outbox after the mail posted straight to it, so it goes after it.
        draft = await self.mail.create(self.owner, BOB, Edit("draft", {
            "to": "drafted@customer.test", "subject": "draft"}))
        self.assertEqual(draft.outcome, Outcome.SAVED)
        self.clock.advance(10)
        posted = await self.mail.create(self.owner, BOB, Edit("outbox", {
            "to": "posted@customer.test", "subject": "posted"}))
        self.assertEqual(posted.outcome, Outcome.ENQUEUED)
        self.clock.advance(10)
        put = await self.mail.update(self.owner, draft.public_id, Edit("outbox"), None)
        self.assertEqual(put.outcome, Outcome.ENQUEUED)
        self.assertEqual([row[2] for row in await self.db.read("outbox", thd_outbox, 10)],
                         await self.queue_ids(posted.public_id, draft.public_id))
        self.sender.startService()
        await self.sender.settled()
        self.assertEqual(self.connector.addresses(),
                         ["posted@customer.test", "drafted@customer.test"])

    async def queue_ids(self, *public_ids: str) -> list[str]:
        """The queue ids of these mails, in this order."""
        rows = await self.db.read("ids", lambda c: c.execute(select(
            mailapi_mail.c.public_id, mailapi_mail.c.queue_id)).all())
        by_public = dict(rows)
        return [by_public[p] for p in public_ids]

    async def test_a_mailbox_waiting_on_its_next_hop_holds_no_other_mailbox_up(self) -> None:
        done(defer.Deferred.fromCoroutine(
            MailboxService(self.db, self.clock).add(JOE, self.owner)))
        for n, sender in ((0, BOB), (1, BOB), (2, JOE)):
            written = await self.mail.create(self.owner, BOB, Edit("outbox", {
                "from": sender, "to": f"r{n}@customer.test", "subject": f"n{n}"}))
            self.assertEqual(written.outcome, Outcome.ENQUEUED)
        self.connector.hold = defer.Deferred()  # the next hop has not answered yet
        self.sender.startService()
        # bob's second mail waits for his first's try; joe's, posted after both, goes.
        self.assertEqual(self.queued(), 2)
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        self.assertEqual(self.queued(), 3)
        addresses = self.connector.addresses()
        self.assertEqual(sorted(addresses), [f"r{n}@customer.test" for n in range(3)])
        self.assertLess(addresses.index("r0@customer.test"),  # bob's, in his order
                        addresses.index("r1@customer.test"))
        await self.sender.stopService()
        self.assertEqual(self.sender.settled().called, True)

    async def test_mail_posted_while_its_mailbox_streams_starts_no_look(self) -> None:
        # As the daemon wires them: the mail service tells the sender of each enqueued mail.
        self.mail.on_enqueued.append(self.sender.enqueued)
        done(defer.Deferred.fromCoroutine(
            MailboxService(self.db, self.clock).add(JOE, self.owner)))
        self.sender.startService()  # an empty outbox
        looks: list[None] = []
        kick = self.sender.kick

        def counted_kick() -> None:
            looks.append(None)
            kick()

        self.sender.kick = counted_kick  # type: ignore[method-assign]
        self.connector.hold = defer.Deferred()  # the next hop has not answered yet
        await self.mail.create(self.owner, BOB, Edit("outbox", {
            "to": "r0@customer.test", "subject": "n0"}))
        self.assertEqual((len(looks), self.queued()), (1, 1))  # bob's stream started
        for n in (1, 2):  # bob's stream will take these in its turn: no look for them
            await self.mail.create(self.owner, BOB, Edit("outbox", {
                "to": f"r{n}@customer.test", "subject": f"n{n}"}))
        self.assertEqual(len(looks), 1)
        await self.mail.create(self.owner, BOB, Edit("outbox", {
            "from": JOE, "to": "r3@customer.test", "subject": "n3"}))
        self.assertEqual((len(looks), self.queued()), (2, 2))  # joe's has no stream yet
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        await self.sender.settled()
        self.assertEqual(self.queued(), 4)
        addresses = self.connector.addresses()
        self.assertEqual([a for a in addresses if a != "r3@customer.test"],
                         ["r0@customer.test", "r1@customer.test", "r2@customer.test"])

    async def test_a_mailbox_whose_send_failed_is_sent_again_after_a_pause(self) -> None:
        written = await self.mail.create(self.owner, BOB, Edit("outbox", {
            "to": "r0@customer.test", "subject": "n0"}))
        self.assertEqual(written.outcome, Outcome.ENQUEUED)
        accept = self.q.spool.accept
        calls: list[str] = []

        async def failing_once(queue_id: str, *args: Any, **kwargs: Any) -> None:
            calls.append(queue_id)
            if len(calls) == 1:
                raise OSError("the spool's disk is full")
            await accept(queue_id, *args, **kwargs)

        self.patch(self.q.spool, "accept", failing_once)
        self.sender.startService()
        self.assertEqual((len(calls), self.queued()), (1, 0))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(self.sender._watched, {})  # nothing kept of the failed try
        self.clock.advance(RETRY_AFTER)
        self.assertEqual((len(calls), self.queued()), (2, 1))
        self.assertEqual(self.connector.addresses(), ["r0@customer.test"])

    async def test_a_stored_mail_whose_address_no_longer_parses_goes_back_to_the_drafts(
            self) -> None:
        """A row put in the outbox before the Mail API refused its address (a local part
        spelling an RFC 2047 word, which the old rules took) cannot be given an envelope.
        Its read failed every read of the outbox: no mailbox's mail went, retried every
        RETRY_AFTER seconds for good. It goes back to the drafts, logged; the rest go."""
        await MailboxService(self.db, self.clock).add(JOE, self.owner)
        written = [await self.mail.create(self.owner, box, Edit("outbox", {
            "to": f"r{n}@customer.test", "subject": f"n{n}"}))
            for n, box in enumerate([BOB, BOB, JOE])]
        self.assertEqual({w.outcome for w in written}, {Outcome.ENQUEUED})
        stored = "=?utf-8?q?=3D=3Futf-8=3Fq=3FYour=5Faccount=3F=3D?= @customer.test"
        await self.db.run("poison", lambda c: c.execute(update(mailapi_mail).where(
            mailapi_mail.c.public_id == written[0].public_id).values(to_addrs=stored)))
        with capturedLogs() as events:
            self.sender.startService()
            await self.sender.settled()
        self.assertEqual(sorted(self.connector.addresses()),
                         ["r1@customer.test", "r2@customer.test"])
        rows = await self.db.read("rows", lambda c: c.execute(select(
            mailapi_mail.c.public_id, mailapi_mail.c.status, mailapi_mail.c.raw,
            mailapi_mail.c.queue_id).order_by(mailapi_mail.c.id)).all())
        self.assertEqual([(r.status, r.raw is None, r.queue_id is None) for r in rows],
                         [("draft", True, True), ("sent", False, False),
                          ("sent", False, False)])
        [warning] = [formatEvent(e) for e in events
                     if e["log_level"] == LogLevel.warn and not load_noise(e)]
        self.assertIn(f"outbox mail {written[0].public_id} cannot be sent", warning)
        self.assertIn("back in the drafts", warning)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_mail_back_in_the_drafts_is_kept_past_the_cap_and_counts_toward_it(
            self) -> None:
        """`[mailapi] max_drafts_per_mailbox` (here 1) with a draft stored: outbox mail
        that cannot be sent goes back to the drafts all the same (it is the user's mail:
        never refused, never lost), though the mailbox then holds more drafts than the cap.
        It is a draft as any other: a new draft is refused until the mailbox is under the
        cap again. (It already was: the cap counts the mailbox's rows in status draft, and
        going back to the drafts, here or when a grantee loses allow_send, sets that
        status: mailcore.mailapi.mailboxes.thd_unsend_where)."""
        self.mail.max_drafts = 1
        draft = await self.mail.create(self.owner, BOB, Edit("draft", {"subject": "d"}))
        self.assertEqual(draft.outcome, Outcome.SAVED)
        posted = await self.mail.create(self.owner, BOB, Edit("outbox", {
            "to": "r0@customer.test", "subject": "n0"}))
        self.assertEqual(posted.outcome, Outcome.ENQUEUED)
        stored = "=?utf-8?q?=3D=3Futf-8=3Fq=3FYour=5Faccount=3F=3D?= @customer.test"
        await self.db.run("poison", lambda c: c.execute(update(mailapi_mail).where(
            mailapi_mail.c.public_id == posted.public_id).values(to_addrs=stored)))
        with capturedLogs():
            self.sender.startService()
            await self.sender.settled()
        rows = await self.db.read("rows", lambda c: c.execute(select(
            mailapi_mail.c.public_id, mailapi_mail.c.status).order_by(mailapi_mail.c.id)).all())
        self.assertEqual([tuple(r) for r in rows],
                         [(draft.public_id, "draft"), (posted.public_id, "draft")])
        with self.assertRaises(MailApiError) as refused:
            await self.mail.create(self.owner, BOB, Edit("draft", {"subject": "more"}))
        self.assertEqual(refused.exception.kind, QUOTA)
        self.assertIn("holds 2 drafts, and [mailapi] max_drafts_per_mailbox allows 1;",
                      str(refused.exception))
        await self.mail.delete(self.owner, draft.public_id)
        with self.assertRaises(MailApiError) as refused:
            await self.mail.create(self.owner, BOB, Edit("draft", {"subject": "more"}))
        self.assertEqual(refused.exception.kind, QUOTA)
        self.assertIn("holds 1 draft, and [mailapi] max_drafts_per_mailbox allows 1;",
                      str(refused.exception))
        await self.mail.delete(self.owner, posted.public_id)
        more = await self.mail.create(self.owner, BOB, Edit("draft", {"subject": "more"}))
        self.assertEqual(more.outcome, Outcome.SAVED)

    async def test_a_mail_the_spool_took_before_a_crash_is_marked_not_sent_again(self) -> None:
        await self.mail.create(self.owner, BOB, Edit("outbox", {
            "to": "r0@customer.test", "subject": "n0"}))
        # The spool committed the mail, then the node died before marking it sent.
        [(_, _, queue_id, envelope, raw, queued)] = await self.db.read(
            "outbox", thd_outbox, 10)
        self.assertFalse(queued)
        await self.q.spool.accept(queue_id, envelope, raw)
        accept = self.q.spool.accept
        calls: list[str] = []

        async def counted(queue_id: str, *args: Any, **kwargs: Any) -> None:
            calls.append(queue_id)
            await accept(queue_id, *args, **kwargs)

        self.patch(self.q.spool, "accept", counted)
        self.sender.startService()
        await self.sender.settled()
        self.assertEqual((calls, self.queued()), ([], 1))
        statuses = await self.db.read("status", lambda c: c.execute(
            select(mailapi_mail.c.status)).scalars().all())
        self.assertEqual(statuses, ["sent"])
        self.assertEqual(self.connector.addresses(), ["r0@customer.test"])

    async def test_after_a_restart_the_next_mail_waits_for_the_one_queued_before(
            self) -> None:
        # The last run handed n0 to the queue (marked sent in the spool's transaction) and
        # died before the queue tried it; n1 waits in the outbox. The queue tries n0 again
        # once its lease is taken back: n1 may not overtake it at the next hop.
        await self.mail.create(self.owner, BOB, Edit("outbox", {
            "to": "r0@customer.test", "subject": "n0"}))
        [(row_id, _, queue_id, envelope, raw, _)] = await self.db.read(
            "outbox", thd_outbox, 10)
        self.connector.hold = defer.Deferred()  # n0's try has not ended
        await self.q.spool.accept(queue_id, envelope, raw, guard=partial(
            outbox.thd_take, row_id=row_id, queue_id=queue_id, now=self.clock.seconds()))
        await self.mail.create(self.owner, BOB, Edit("outbox", {
            "to": "r1@customer.test", "subject": "n1"}))
        self.sender.startService()
        self.assertEqual(self.queued(), 1)  # n1 waits for n0's try
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        self.assertEqual(self.queued(), 2)
        await self.sender.settled()
        self.assertEqual(self.connector.addresses(), ["r0@customer.test", "r1@customer.test"])

    async def test_the_next_message_goes_once_the_try_is_recorded_before_its_commit(
            self) -> None:
        for n in range(3):
            await self.mail.create(self.owner, BOB, Edit("outbox", {
                "to": f"r{n}@customer.test", "subject": f"n{n}"}))
        # Only the recorded results can wake the sender: it hears of no commit.
        self.q.spool.on_results.remove(self.sender._wake)
        self.connector.hold = defer.Deferred()
        self.sender.startService()
        self.assertEqual(self.queued(), 1)
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        self.assertEqual(self.queued(), 3)  # and no time passed
        self.assertEqual(self.connector.addresses(),
                         ["r0@customer.test", "r1@customer.test", "r2@customer.test"])

    async def test_the_owner_deletes_its_mailbox_only_once_its_outbox_is_sent(self) -> None:
        # Mail answered 202 is never deleted with its mailbox (found by an audit: the rows
        # went by cascade, and some of them reached the queue anyway, from the sender's
        # batch). While a mail is handed to the queue its row is still in the outbox.
        for n in range(3):
            await self.mail.create(self.owner, BOB, Edit("outbox", {
                "to": f"r{n}@customer.test", "subject": f"n{n}"}))
        boxes = MailboxService(self.db, self.clock)
        self.connector.hold = defer.Deferred()
        self.sender.startService()
        self.assertEqual(self.queued(), 1)
        with self.assertRaises(MailApiError) as refused:
            await boxes.delete(self.owner, BOB)
        self.assertEqual(refused.exception.kind, CONFLICT)
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        self.assertEqual(self.queued(), 3)
        await self.sender.settled()
        await boxes.delete(self.owner, BOB)
        self.assertEqual(await boxes.find(BOB), None)
        self.assertEqual(self.connector.addresses(),
                         ["r0@customer.test", "r1@customer.test", "r2@customer.test"])

    async def test_mail_to_a_domain_claimed_through_the_api_does_not_go_to_the_claimant(
        self,
    ) -> None:
        # With [protecmail] verify_domains off anyone may claim a name through the API
        # (served, not vouched for): every user's mail to it goes the way the world's mail
        # goes (here the relayhost; the MX otherwise), not to the claimant's next hop.
        await self.db.run("claim", thd_add_domain, "gmail.test", "10.6.6.6", 25)
        for to in ("victim@gmail.test", "r@customer.test"):
            await self.mail.create(self.owner, BOB, Edit("outbox", {"to": to}))
        self.sender.startService()
        await self.sender.settled()
        self.assertEqual([(hop.label, rcpts) for hop, _f, rcpts, _b, _t
                          in self.connector.delivered],
                         [("relay.test:25", ["victim@gmail.test"]),
                          ("10.0.0.1:2525", ["r@customer.test"])])

    async def post_outbox(self, count: int) -> list[str]:
        """`count` mails put in BOB's outbox, to r0@customer.test, r1@...: their ids."""
        public_ids = []
        for n in range(count):
            written = await self.mail.create(self.owner, BOB, Edit("outbox", {
                "to": f"r{n}@customer.test", "subject": f"n{n}"}))
            public_ids.append(written.public_id)
        return public_ids

    async def test_a_mail_deleted_once_the_sender_read_it_is_not_sent(self) -> None:
        # DELETE answered 202 "mail deleted" means the mail is not sent (found by an audit:
        # the sender kept the rows it read and handed a deleted one to the queue anyway).
        public_ids = await self.post_outbox(3)
        self.connector.hold = defer.Deferred()
        self.sender.startService()  # it read all three; the second waits for the first
        self.assertEqual(self.queued(), 1)
        await self.mail.delete(self.owner, public_ids[1])
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        await self.sender.settled()
        self.assertEqual(self.queued(), 2)
        self.assertEqual(self.connector.addresses(), ["r0@customer.test", "r2@customer.test"])
        rows = await self.db.read("rows", lambda c: c.execute(select(
            mailapi_mail.c.public_id, mailapi_mail.c.status)).all())
        self.assertEqual(sorted(rows), sorted([(public_ids[0], "sent"),
                                               (public_ids[2], "sent")]))

    async def set_active(self, active: bool) -> None:
        """`mailcore user disable/enable` of the mailbox's owner."""
        await self.db.run("active", lambda c: c.execute(
            update(users).where(users.c.id == self.owner).values(is_active=active)))

    async def test_a_disabled_owners_outbox_waits_until_it_is_enabled(self) -> None:
        # `mailcore user disable` stops the account acting: its outbox mail is neither sent
        # nor failed while it is disabled, and goes, in its order, once it is enabled.
        await self.set_active(False)
        public_ids = await self.post_outbox(2)
        self.sender.startService()
        await self.sender.settled()
        self.assertEqual((self.queued(), self.connector.addresses()), (0, []))
        rows = await self.db.read("rows", lambda c: c.execute(select(
            mailapi_mail.c.public_id, mailapi_mail.c.status)).all())
        self.assertEqual(sorted(rows), sorted((p, "outbox") for p in public_ids))
        await self.set_active(True)
        self.sender.kick()
        await self.sender.settled()
        self.assertEqual(self.connector.addresses(), ["r0@customer.test", "r1@customer.test"])

    async def test_the_outbox_of_a_disabled_users_domain_waits_whoever_owns_the_mailbox(
            self) -> None:
        # The domain's owner is disabled (its inbound mail is refused 450 for now), and
        # joe, another user with a mailbox in it, went on sending as that domain: only the
        # mailbox owner's state was looked at. Now the mail waits until the domain's owner
        # is enabled, also when the sender read it before the owner was disabled.
        joe = await self.db.run("joe", lambda c: c.execute(insert(users).values(
            username="joe", email=JOE, nic="joe", created_at=datetime.datetime.now(
                datetime.UTC)).returning(users.c.id)).scalar_one())
        await MailboxService(self.db, self.clock).add(JOE, joe)
        await self.set_active(False)
        for n in range(2):
            written = await self.mail.create(joe, JOE, Edit("outbox", {
                "to": f"r{n}@customer.test", "subject": f"n{n}"}))
            self.assertEqual(written.outcome, Outcome.ENQUEUED)
        self.assertEqual(await self.db.read("outbox", thd_outbox, 10), [])
        self.sender.startService()
        await self.sender.settled()
        self.assertEqual((self.queued(), self.connector.addresses()), (0, []))
        # Read while the owner was enabled, then disabled before the spool took it.
        await self.set_active(True)
        [first, _] = await self.db.read("outbox", thd_outbox, 10)
        await self.set_active(False)
        self.assertFalse(await self.db.run("take", outbox.thd_take, first[0], first[2],
                                           self.clock.seconds()))
        await self.set_active(True)
        self.sender.kick()
        await self.sender.settled()
        self.assertEqual(self.connector.addresses(), ["r0@customer.test", "r1@customer.test"])

    async def test_outbox_mail_to_a_suspended_customers_domain_waits_in_the_queue(
            self) -> None:
        # carol's relayed domain is suspended (carol disabled): the world's mail for it is
        # refused 450 4.2.1, but bob's outbox mail to it was relayed to carol's server at
        # once (routing read the domain's next hop only). Now it waits in the queue, deferred
        # 4.2.1, and goes once carol is enabled; bob's other mail goes on meanwhile.
        now = datetime.datetime.now(datetime.UTC)

        def carol_domain(conn: Any) -> int:
            carol = conn.execute(insert(users).values(
                username="carol", email="carol@carol.test", nic="carol", created_at=now,
                is_active=False).returning(users.c.id)).scalar_one()
            domain_id = thd_add_domain(conn, "carol.test", "10.0.0.9", 25, vouched=True)
            conn.execute(update(domains).where(domains.c.id == domain_id)
                         .values(owner_id=carol))
            return int(carol)

        carol = await self.db.run("carol", carol_domain)
        for to in ("x@carol.test", "r0@customer.test"):
            written = await self.mail.create(self.owner, BOB, Edit("outbox", {"to": to}))
            self.assertEqual(written.outcome, Outcome.ENQUEUED)
        self.sender.startService()
        await self.sender.settled()
        await self.q.spool.drain()
        self.assertEqual(self.connector.addresses(), ["r0@customer.test"])
        r = queue_recipients.c
        [(state, error)] = await self.db.read("state", lambda c: c.execute(
            select(r.state, r.last_error).where(r.address == "x@carol.test")).all())
        self.assertEqual(state, "deferred")
        self.assertIn("4.2.1", error)
        await self.db.run("enable", lambda c: c.execute(
            update(users).where(users.c.id == carol).values(is_active=True)))
        self.clock.advance(3600)
        await self.q.spool.drain()
        self.assertEqual(self.connector.addresses(), ["r0@customer.test", "x@carol.test"])

    async def test_mail_read_before_its_owner_was_disabled_stays_in_the_outbox(self) -> None:
        public_ids = await self.post_outbox(3)
        self.connector.hold = defer.Deferred()
        self.sender.startService()  # it read all three; the second waits for the first
        self.assertEqual(self.queued(), 1)
        await self.set_active(False)
        hold, self.connector.hold = self.connector.hold, None
        hold.callback(None)
        await self.sender.settled()
        self.assertEqual(self.connector.addresses(), ["r0@customer.test"])
        rows = await self.db.read("rows", lambda c: c.execute(select(
            mailapi_mail.c.public_id, mailapi_mail.c.status)).all())
        self.assertEqual(sorted(rows), sorted([(public_ids[0], "sent"),
                                               (public_ids[1], "outbox"),
                                               (public_ids[2], "outbox")]))
        await self.set_active(True)
        self.sender.kick()
        await self.sender.settled()
        self.assertEqual(self.connector.addresses(),
                         ["r0@customer.test", "r1@customer.test", "r2@customer.test"])

    async def test_one_read_of_the_outbox_holds_at_most_batch_bytes_of_messages(
            self) -> None:
        # The sender read up to 200 outbox rows with their messages at once and held them
        # until it had sent them: 200 mails of max_message_bytes (25 MiB of attachments,
        # base64) are several GB (found by an audit). Each read now takes the first
        # messages that fit in BATCH_BYTES (at least one), and the stream reads on.
        for n in range(4):
            await self.mail.create(self.owner, BOB, Edit("outbox", {
                "to": f"r{n}@customer.test", "subject": f"n{n}", "body": "x\n" * 50_000}))
        sizes = [len(row[4]) for row in await self.db.read("outbox", thd_outbox, 10)]
        self.assertEqual(len(sizes), 4)
        self.patch(outbox, "BATCH_BYTES", sizes[0] + sizes[1] + sizes[2] // 2)
        read = await self.db.read("outbox", thd_outbox, 10)
        self.assertEqual([row[3].recipients[0].address for row in read],
                         ["r0@customer.test", "r1@customer.test"])
        self.patch(outbox, "BATCH_BYTES", 1)  # the first always, however large
        self.assertEqual(len(await self.db.read("outbox", thd_outbox, 10)), 1)
        self.sender.startService()
        await self.sender.settled()
        self.assertEqual(self.connector.addresses(), [f"r{n}@customer.test" for n in range(4)])
        self.assertEqual(self.queued(), 4)
