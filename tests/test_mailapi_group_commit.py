"""Mail API writes in the spool's group commit (MailService's `ride`, which the daemon sets on
SQLite): a post commits in the spool's next group, with the mail posted meanwhile and the
queue's messages, one fsync for all of them; it is answered after that commit, refused alone
(its savepoint) when its own write is, and failed when the group's commit fails."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Connection, event, select
from twisted.internet import defer, threads
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.mailapi import QUOTA, MailApiError
from mailcore.mailapi.files import MailFiles
from mailcore.mailapi.mail import Edit, MailService, Outcome
from mailcore.mailapi.outbox import OutboxSender
from mailcore.outages import NO_ROOM, outage
from mailcore.queue.metrics import QueueMetrics
from mailcore.queue.settings import QueueSettings
from mailcore.queue.spool import Spool, SpoolError
from mailcore.store import Database
from mailcore.store.engine import WRITE_INTENT
from mailcore.store.schema import mailapi_mail
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin, open_database
from tests.support.mailsink import add_hosted_mailbox, envelope
from tests.support.reactor import get_reactor
from tests.support.servers import sleep
from tests.test_mailapi_mail import JOE, MailApiTestCase

BOB = "bob@hosted.test"


def _rows(conn: Connection) -> list[Any]:
    return list(conn.execute(select(
        mailapi_mail.c.subject, mailapi_mail.c.status, mailapi_mail.c.outbox_seq,
    ).order_by(mailapi_mail.c.id)).all())


class GroupCommitTests(TestCase):
    """On a real threaded SQLite, as the daemon runs it."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.db: Database = await open_database(self, "sqlite")
        self.owner = await add_hosted_mailbox(self.db, BOB)
        # Lingering far longer than the test: every post rides the one stream.
        self.spool = Spool(self.db, get_reactor(), QueueSettings(node_id="test"),
                           QueueMetrics(CollectorRegistry()), linger=3600.0)
        self.addCleanup(self.spool.drain)
        self.mail = self.service()
        # Write transactions begun on the store (the spool's stream begins one per group).
        self.begun: list[bool] = []

        def begun(conn: Any) -> None:
            if conn.info.get(WRITE_INTENT, True):
                self.begun.append(True)

        event.listen(self.db.engine, "begin", begun)
        self.addCleanup(event.remove, self.db.engine, "begin", begun)

    def service(self, quota: int | None = None) -> MailService:
        return MailService(self.db, Clock(), "mx.test", MailFiles(Path(self.mktemp())),
                           CpuPool.for_tests(), quota_bytes=quota, ride=self.spool.ride)

    def post(self, subject: str, status: str = "outbox", mail: MailService | None = None
             ) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine((mail or self.mail).create(
            self.owner, BOB, Edit(status, {"to": "joe@far.test", "subject": subject,
                                           "body": "hello\n"})))

    async def test_posts_at_once_share_group_commits_and_keep_the_outbox_order(self) -> None:
        await self.post("first")  # the stream now lingers for more
        commits, begun = self.spool.commits, len(self.begun)
        posted = [self.post(f"n{n}", "outbox" if n % 3 else "draft") for n in range(12)]
        written = await defer.gatherResults(posted)
        self.assertEqual([w.outcome for w in written],
                         [Outcome.ENQUEUED if n % 3 else Outcome.SAVED for n in range(12)])
        # Fewer commits than posts, and no transaction of their own.
        self.assertLess(self.spool.commits - commits, 12)
        self.assertEqual(len(self.begun) - begun, self.spool.commits - commits)
        self.assertEqual(self.spool.streams, 1)
        rows = await self.db.read("rows", _rows)
        # Posts at once have no order among them (a mail to send has its addresses parsed
        # on the pool first); each has its place in the outbox as it was stored.
        self.assertEqual(sorted(r.subject for r in rows),
                         sorted(["first"] + [f"n{n}" for n in range(12)]))
        sent = [r.outbox_seq for r in rows if r.status == "outbox"]
        self.assertEqual(sent, list(range(1, 10)))
        # One after the other, they are sent in the order they were posted.
        for n in range(3):
            await self.post(f"then{n}")
        rows = await self.db.read("rows", _rows)
        self.assertEqual([(r.subject, r.outbox_seq) for r in rows[-3:]],
                         [("then0", 10), ("then1", 11), ("then2", 12)])

    async def test_a_refused_post_stores_nothing_and_the_others_commit(self) -> None:
        await self.post("first")
        small = self.service(quota=1000)
        posted = [self.post("a"), self.post("big " * 300, mail=small), self.post("b")]
        results = await defer.DeferredList(posted, consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, False, True])
        error = results[1][1].value
        self.assertIsInstance(error, MailApiError)
        self.assertEqual(error.kind, QUOTA)
        rows = await self.db.read("rows", _rows)
        # "a" and "b" are prepared side by side on the pool: either may be stored first.
        subjects = [r.subject for r in rows]
        self.assertEqual((subjects[0], sorted(subjects[1:])), ("first", ["a", "b"]))

    async def test_a_post_is_answered_only_once_its_group_has_committed(self) -> None:
        gate = threading.Event()
        original = self.spool._thd_commit

        def held(conn: Connection, group: Any) -> Any:
            result = original(conn, group)  # the riders have written, nothing committed
            if group.riders[0].name == "mailapi_create" and len(holds) == 1:
                gate.wait(30)
            holds.append(None)
            return result

        holds: list[None] = []
        self.patch(self.spool, "_thd_commit", held)  # (the stream takes it as it starts)
        await self.post("first")

        self.patch(self.spool, "_thd_commit", held)
        posted = self.post("second")
        await sleep(0.2)
        self.assertFalse(posted.called)
        self.assertEqual([r.subject for r in await self.db.read("rows", _rows)], ["first"])
        gate.set()
        self.assertEqual((await posted).outcome, Outcome.ENQUEUED)
        self.assertEqual([r.subject for r in await self.db.read("rows", _rows)],
                         ["first", "second"])

    async def test_a_failed_group_commit_fails_the_post_as_an_outage(self) -> None:
        original = self.spool._thd_commit
        full: list[bool] = [False]

        def failing(conn: Connection, group: Any) -> Any:
            result = original(conn, group)
            if full[0]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return result

        self.patch(self.spool, "_thd_commit", failing)  # (the stream takes it as it starts)
        await self.post("first")
        full[0] = True
        with self.assertRaises(SpoolError) as raised:
            await self.post("second")
        self.assertEqual(outage(raised.exception), NO_ROOM)
        self.assertEqual([r.subject for r in await self.db.read("rows", _rows)], ["first"])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)  # the spool's log line


class DaemonTests(MailApiTestCase):
    """The daemon's services (SQLite): a post rides the spool's group commit."""

    async def test_a_post_commits_in_the_spools_group_commit(self) -> None:
        core = self.web.core
        self.assertEqual(core.mail.ride, core.spool.ride)
        commits = core.spool.commits
        status, body = await self.as_("bob", "POST", "/api/v1/mail/", json={
            "status": "outbox", "to": JOE, "subject": "hi", "body": "hello"})
        self.assertEqual(status, 202, body)
        self.assertGreater(core.spool.commits, commits)
        self.assertEqual([r.status for r in await self.rows()], ["outbox"])


class GivenUpTests(TestCase):
    """A caller that gives up (a reply deadline, a client gone) takes back the writes the
    store has not begun: the client, told its post failed, posts again, and one mail is
    stored, not two. On SQLite a post rides the spool's group commit (held here in a group
    of its own so that what comes after waits for it)."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.db: Database = await open_database(self, "sqlite")
        self.owner = await add_hosted_mailbox(self.db, BOB)
        self.spool = Spool(self.db, get_reactor(), QueueSettings(node_id="test"),
                           QueueMetrics(CollectorRegistry()), linger=3600.0)
        self.addCleanup(self.spool.drain)
        self.mail = MailService(self.db, Clock(), "mx.test", MailFiles(Path(self.mktemp())),
                                CpuPool.for_tests(), ride=self.spool.ride)
        self.entered, self.gate = threading.Event(), threading.Event()
        self.addCleanup(self.gate.set)
        self.hold_next = False
        original = self.spool._thd_commit

        def held(conn: Connection, group: Any) -> Any:
            result = original(conn, group)
            if self.hold_next:
                self.hold_next = False
                self.entered.set()
                self.gate.wait(30)
            return result

        self.patch(self.spool, "_thd_commit", held)  # (the stream takes it as it starts)
        await self.post("first", "draft")

    def post(self, subject: str, status: str = "draft") -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self.mail.create(
            self.owner, BOB, Edit(status, {"to": "joe@far.test", "subject": subject,
                                           "body": "hello\n"})))

    async def hold(self) -> defer.Deferred[Any]:
        """The stream's next group (a rider of its own) held until `gate` is set."""
        self.hold_next = True
        holding = self.spool.ride("hold", lambda conn: None)
        self.assertTrue(await threads.deferToThread(self.entered.wait, 30))
        return holding

    async def give_up_while_committed(self, subject: str) -> None:
        """Post `subject` to the outbox and give it up while its group commits (held until
        `gate` is set: the commit then lands)."""
        self.hold_next = True
        posted = self.post(subject, "outbox")
        self.assertTrue(await threads.deferToThread(self.entered.wait, 30))
        posted.cancel()
        self.failureResultOf(posted, defer.CancelledError)
        self.gate.set()
        await self.spool.drain()

    async def test_a_post_given_up_before_its_group_takes_it_is_never_stored(self) -> None:
        holding = await self.hold()
        posted = self.post("second")
        posted.cancel()
        self.failureResultOf(posted, defer.CancelledError)
        self.gate.set()
        await holding
        await self.post("second")  # the client's retry
        self.assertEqual([r.subject for r in await self.db.read("rows", _rows)],
                         ["first", "second"])

    async def test_a_post_given_up_once_its_group_took_it_is_stored_and_told(self) -> None:
        told: list[int | None] = []
        self.mail.on_enqueued.append(told.append)
        await self.give_up_while_committed("second")
        rows = await self.db.read("rows", _rows)
        self.assertEqual([(r.subject, r.status) for r in rows],
                         [("first", "draft"), ("second", "outbox")])
        self.assertEqual(len(told), 1)  # its outcome was heard: the outbox was told

    async def test_a_post_given_up_once_its_group_took_it_is_sent_from_the_outbox(
        self,
    ) -> None:
        """The outbox is told of the mail after the post was given up: its look for mail to
        send ran in the post's errand, given up, and failed at once (CancelledError, taken
        for a stop), so the mail stayed in the outbox until something else looked again
        (a single node has no poll)."""
        sender = OutboxSender(self.db, Clock(), self.spool)
        self.mail.on_enqueued.append(sender.enqueued)
        sender.startService()
        await sender.settled()
        await self.give_up_while_committed("second")
        # The sender's stream hands the mail to the spool, then waits for the queue (none
        # here) to try it: what is waited for is the row marked sent.
        for _ in range(100):
            rows = await self.db.read("rows", _rows)
            if rows[-1].status != "outbox":
                break
            await sleep(0.05)
        sender.stopService()
        self.assertEqual([(r.subject, r.status) for r in rows],
                         [("first", "draft"), ("second", "sent")])

    async def test_riders_and_chores_cancelled_before_their_turn_never_run(self) -> None:
        ran: list[str] = []
        holding = await self.hold()
        rider = self.spool.ride("rider", lambda conn: ran.append("rider"))
        chore = self.spool.run_serialized("chore", lambda conn: ran.append("chore"))
        after = self.spool.ride("after", lambda conn: ran.append("after"))
        rider.cancel()
        chore.cancel()
        self.failureResultOf(rider, defer.CancelledError)
        self.failureResultOf(chore, defer.CancelledError)
        self.gate.set()
        await holding
        await after
        await self.spool.drain()
        self.assertEqual(ran, ["after"])


class GivenUpOwnTransactionTests(DatabaseMixin):
    """Without the spool (PostgreSQL): a post is a run_prepared of its own, dropped when its
    caller gives up before the store's thread takes it."""

    async def test_a_post_given_up_while_queued_is_never_stored(self) -> None:
        db = await self.open_database(max_threads=1)
        owner = await add_hosted_mailbox(db, BOB)
        mail = MailService(db, Clock(), "mx.test", MailFiles(Path(self.mktemp())),
                           CpuPool.for_tests())
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def hold(conn: Connection) -> None:
            entered.set()
            release.wait(30)

        def post(subject: str) -> defer.Deferred[Any]:
            return defer.Deferred.fromCoroutine(mail.create(owner, BOB, Edit(
                "draft", {"to": "joe@far.test", "subject": subject, "body": "hello\n"})))

        holding = db.read_long("hold", hold)
        self.assertTrue(await threads.deferToThread(entered.wait, 30))
        posted = post("once")
        posted.cancel()
        self.failureResultOf(posted, defer.CancelledError)
        release.set()
        await holding
        await post("once")  # the client's retry
        self.assertEqual([r.subject for r in await db.read("rows", _rows)], ["once"])


class SQLiteGivenUpOwnTransactionTests(GivenUpOwnTransactionTests, TestCase):
    backend = "sqlite"


class PostgresGivenUpOwnTransactionTests(GivenUpOwnTransactionTests, TestCase):
    backend = "postgresql"


class LaneAfterAPostGivenUpTests(TestCase):
    """The spool's lane runs every caller's work: a post whose client gave up while its
    group committed takes none of what the lane runs next down with it (the post started
    the lane, which was idle: the commit stream ran in the post's errand)."""

    timeout = 60

    async def test_the_chore_and_message_after_a_post_given_up_go_on(self) -> None:
        db: Database = await open_database(self, "sqlite")
        owner = await add_hosted_mailbox(db, BOB)
        spool = Spool(db, get_reactor(), QueueSettings(node_id="test"),
                      QueueMetrics(CollectorRegistry()))  # (no linger: the post starts it)
        self.addCleanup(spool.drain)
        mail = MailService(db, Clock(), "mx.test", MailFiles(Path(self.mktemp())),
                           CpuPool.for_tests(), ride=spool.ride)
        entered, gate = threading.Event(), threading.Event()
        self.addCleanup(gate.set)
        original = spool._thd_commit

        def held(conn: Connection, group: Any) -> Any:
            result = original(conn, group)
            if not entered.is_set():
                entered.set()
                gate.wait(30)
            return result

        self.patch(spool, "_thd_commit", held)
        posted = defer.Deferred.fromCoroutine(mail.create(owner, BOB, Edit(
            "draft", {"to": "joe@far.test", "subject": "left", "body": "hello\n"})))
        self.assertTrue(await threads.deferToThread(entered.wait, 30))
        posted.cancel()  # its client left while its group committed
        self.failureResultOf(posted, defer.CancelledError)
        chore = spool.run_serialized("chore", lambda conn: "ran")
        accepted = defer.Deferred.fromCoroutine(spool.accept(
            "Q1", envelope("a@x.test", ("b@far.test", None)), b"Subject: x\r\n\r\nhi\r\n"))
        gate.set()
        self.assertEqual(await chore, "ran")
        await accepted
        self.assertEqual([r.subject for r in await db.read("rows", _rows)], ["left"])
        self.assertEqual(self.flushLoggedErrors(), [])
