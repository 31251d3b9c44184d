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
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.mailapi import QUOTA, MailApiError
from mailcore.mailapi.files import MailFiles
from mailcore.mailapi.mail import Edit, MailService, Outcome
from mailcore.outages import NO_ROOM, outage
from mailcore.queue.metrics import QueueMetrics
from mailcore.queue.settings import QueueSettings
from mailcore.queue.spool import Spool, SpoolError
from mailcore.store import Database
from mailcore.store.engine import WRITE_INTENT
from mailcore.store.schema import mailapi_mail
from mailcore.workers import CpuPool
from tests.support.db import open_database
from tests.support.mailsink import add_hosted_mailbox
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
        self.assertEqual([r.subject for r in rows], ["first", "a", "b"])

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
