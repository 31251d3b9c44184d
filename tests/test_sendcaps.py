"""Per-user caps on the mail the APIs send ([limits], mailcore.sendcaps): sends counted over
sliding windows in the store, on SQLite and PostgreSQL, sends at once never sharing the last
of a cap; the Mail API keeping a send past a cap as a draft (429, Retry-After), safedrop
leaving the bundle unsent, both counting against one total; one warning per spell; the
/metrics counter; the [limits] table."""

from __future__ import annotations

import datetime
import threading
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.fernet import Fernet
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from twisted.internet import defer, threads
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from mailcore import sendcaps
from mailcore.config import Config, ConfigError
from mailcore.fetch.secrets import SecretBox
from mailcore.mailapi.files import MailFiles
from mailcore.mailapi.mail import Edit, MailService
from mailcore.queue.metrics import QueueMetrics
from mailcore.queue.settings import QueueSettings
from mailcore.queue.spool import Spool
from mailcore.safedrop.model import SafedropSettings
from mailcore.safedrop.service import SafedropService
from mailcore.sendcaps import SendCaps, SendCapSettings, http_refusal
from mailcore.startup import check_tables
from mailcore.store import Database
from mailcore.store.schema import (
    api_sends,
    drop_bundles,
    drop_files,
    drop_recipients,
    mailapi_mail,
    mailboxes,
    queue_messages,
)
from mailcore.store.sends import SendVerdict, Window, thd_take_sends
from mailcore.workers import CpuPool
from tests.support.db import (
    DatabaseMixin,
    engine_query_plans,
    full_scans,
    open_database,
    open_database_at,
    transaction_answers,
)
from tests.support.fetchenv import thd_make_user
from tests.support.logs import logged, logged_at
from tests.support.mailsink import add_hosted_mailbox
from tests.support.reactor import get_reactor
from tests.support.web import Web, header
from tests.test_mailapi_mail import BOB, MailApiTestCase
from tests.test_web_safedrop_api import MULTIPART, SafedropFixture, multipart_file

T0 = 1_000_000.0
OTHER = "sales@hosted.test"


def _count(table: sa.Table) -> Any:
    return lambda conn: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()


class StoreCapsMixin(DatabaseMixin):
    timeout = 120
    windows = (Window("hour", 3600.0, 5), Window("day", 86400.0, 8))

    async def setUp(self) -> None:  # type: ignore[override]
        self.db: Database = await self.open_database()
        self.user: int = await self.db.run("user", thd_make_user, "bob")

    async def take(self, recipients: int, at: float, *, take: bool = True) -> Any:
        return await self.db.run("take", thd_take_sends, self.user, recipients, T0 + at,
                                 self.windows, take=take)

    async def test_sends_pass_until_a_cap_then_as_the_oldest_leave_the_window(self) -> None:
        self.assertTrue((await self.take(3, 0)).allowed)
        self.assertTrue((await self.take(2, 600)).allowed)
        refused = await self.take(1, 1200)
        self.assertFalse(refused.allowed)
        assert refused.window is not None
        self.assertEqual((refused.window.name, refused.used, refused.retry_after),
                         ("hour", 5, 2400))  # the first send leaves the hour at 3600
        # An hour after the first, its 3 are out of the hour: 2 are in, 4 more is 1 too
        # many there until 4200 (when 600's leave), but the day's 5 + 4 is over 8 until
        # the first leaves the day: the longer wait is the answer.
        refused = await self.take(4, 3600)
        assert refused.window is not None
        self.assertEqual((refused.allowed, refused.window.name, refused.used,
                          refused.retry_after), (False, "day", 5, 86400 - 3600))
        self.assertTrue((await self.take(3, 3600)).allowed)
        # The day counts all three (8 of 8) while the hour holds only the last one.
        refused = await self.take(1, 7300)
        assert refused.window is not None
        self.assertEqual((refused.allowed, refused.window.name, refused.used,
                          refused.retry_after), (False, "day", 8, 86400 - 7300))
        # A check records nothing; a refusal neither.
        self.assertTrue((await self.take(1, 86400, take=False)).allowed)
        self.assertEqual(await self.db.read("n", _count(api_sends)), 3)
        self.assertTrue((await self.take(1, 86400)).allowed)
        # The user's sends that no window counts any more went with that send.
        self.assertEqual(await self.db.read("n", _count(api_sends)), 3)

    async def test_a_send_reads_every_window_in_one_query(self) -> None:
        statements: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        sa.event.listen(self.db.engine, "before_cursor_execute", seen)
        self.addCleanup(sa.event.remove, self.db.engine, "before_cursor_execute", seen)
        await self.take(3, 0)
        refused = await self.take(3, 600, take=False)
        assert refused.window is not None
        self.assertEqual((refused.window.name, refused.used), ("hour", 3))
        # One sum of the hour's and the day's each, not one per window.
        self.assertEqual(sum("sum(" in s.lower() for s in statements), 2, statements)

    async def test_a_send_over_a_cap_alone_never_passes(self) -> None:
        refused = await self.take(6, 0)
        assert refused.window is not None
        self.assertEqual((refused.allowed, refused.window.name, refused.retry_after),
                         (False, "hour", None))
        self.assertEqual(await self.db.read("n", _count(api_sends)), 0)

    async def test_sends_at_once_never_share_the_last_of_a_cap(self) -> None:
        verdicts = await defer.gatherResults([
            defer.Deferred.fromCoroutine(self.take(1, 0)) for _ in range(16)])
        self.assertEqual(sum(v.allowed for v in verdicts), 5)
        self.assertEqual(await self.db.read("sum", lambda c: c.execute(
            sa.select(sa.func.sum(api_sends.c.recipients))).scalar()), 5)

    async def test_sends_no_window_counts_are_swept(self) -> None:
        clock = Clock()
        clock.advance(T0)
        caps = SendCaps(self.db, clock, SendCapSettings(user_recipients_per_hour=5,
                                                        user_recipients_per_day=0),
                        CollectorRegistry())
        await self.db.run("t", caps.thd_take, self.user, 2, T0)
        await self.db.run("t", caps.thd_take, self.user, 2, T0 + 1800)
        clock.advance(3600)
        self.assertEqual(await caps.sweep(), 1)
        self.assertEqual(await self.db.read("n", _count(api_sends)), 1)

    async def test_the_sweep_deletes_a_batch_a_transaction_through_its_index(self) -> None:
        """The sweep holds no long write transaction: SWEEP_BATCH sends at most each, found
        through ix_api_sends_at (no batch reads the whole table)."""
        clock = Clock()
        clock.advance(T0)
        caps = SendCaps(self.db, clock, SendCapSettings(user_recipients_per_hour=50,
                                                        user_recipients_per_day=0),
                        CollectorRegistry())
        for at in (0, 1, 2, 3, 4, 3000):
            await self.db.run("t", caps.thd_take, self.user, 1, T0 + at)
        self.patch(sendcaps, "SWEEP_BATCH", 2)
        batches = transaction_answers(self, self.db, "api_sends_sweep".__eq__)
        clock.advance(3600 + 10)
        with engine_query_plans(self.db.engine) as plans:
            self.assertEqual(await caps.sweep(), 5)
        self.assertEqual([n for _, n in batches], [2, 2, 1])
        self.assertEqual(await self.db.read("n", _count(api_sends)), 1)
        self.assertEqual(full_scans(plans, "api_sends"), [])
        self.assertTrue([p for p in plans if "ix_api_sends_at" in p], plans)


class SQLiteStoreCapsTests(StoreCapsMixin, TestCase):
    backend = "sqlite"


class PostgresStoreCapsTests(StoreCapsMixin, TestCase):
    backend = "postgresql"


async def _two_mailboxes(db: Database) -> int:
    """Bob's id, the owner of mailboxes BOB and OTHER."""
    owner = await add_hosted_mailbox(db, BOB)
    await db.run("box", lambda c: c.execute(sa.insert(mailboxes).values(
        address=OTHER, owner_id=owner, created_at=1.0, domain_id=c.execute(
            sa.select(mailboxes.c.domain_id)).scalar())))
    return owner


class ServiceCapsMixin(DatabaseMixin):
    """MailService on a threaded store, as the daemon runs it: on PostgreSQL each post a
    transaction of its own, on SQLite a rider of the spool's group commits."""

    timeout = 120

    async def test_posts_at_once_send_no_more_than_the_cap(self) -> None:
        db = await self.open_database()
        # Two mailboxes of the user: posts from one wait on each other for the mailbox's
        # row; the user's count holds across them.
        owner = await _two_mailboxes(db)
        clock = Clock()
        clock.advance(T0)
        caps = SendCaps(db, clock, SendCapSettings(user_recipients_per_hour=4),
                        CollectorRegistry())
        ride = None
        if self.backend == "sqlite":  # as the daemon: in the spool's group commits
            spool = Spool(db, get_reactor(), QueueSettings(node_id="test"),
                          QueueMetrics(CollectorRegistry()), linger=3600.0)
            self.addCleanup(spool.drain)
            ride = spool.ride
        mail = MailService(db, clock, "mx.test", MailFiles(Path(self.mktemp())),
                           CpuPool.for_tests(), caps=caps, ride=ride)
        written = await defer.gatherResults([defer.Deferred.fromCoroutine(mail.create(
            owner, BOB, Edit("outbox", {"to": f"r{n}@far.test, x@far.test",
                                        "from": (BOB, OTHER)[n % 2]})))
            for n in range(6)])
        outcomes = sorted(w.outcome.value for w in written)
        self.assertEqual(outcomes, ["capped"] * 4 + ["enqueued"] * 2)
        rows = await db.read("rows", lambda c: c.execute(
            sa.select(mailapi_mail.c.status, sa.func.count())
            .group_by(mailapi_mail.c.status)).all())
        self.assertEqual(sorted(map(tuple, rows)), [("draft", 4), ("outbox", 2)])


class WaitingCaps(SendCaps):
    """Caps whose first send, once counted (its user's lock held), waits for `go`."""

    def __init__(self, db: Database, clock: Clock) -> None:
        super().__init__(db, clock, SendCapSettings(user_recipients_per_hour=100),
                         CollectorRegistry())
        self.first = threading.Lock()
        self.counted = threading.Event()
        self.go = threading.Event()

    def thd_take(self, conn: sa.Connection, user_id: int, recipients: int,
                 now: float) -> SendVerdict:
        verdict = super().thd_take(conn, user_id, recipients, now)
        if self.first.acquire(blocking=False):
            self.counted.set()
            self.go.wait(30)
        return verdict


class MovedDraftSendTests(TestCase):
    timeout = 120

    async def test_a_draft_sent_from_another_mailbox_waits_for_no_post(self) -> None:
        """A draft of mailbox A sent from mailbox B, and meanwhile a post of the same user
        from B: each has one mailbox row, and the moved draft needs B's. When the moved
        draft counted its send (the user's send-cap lock held) and then waited for B's row
        while the post held B's row and waited for the lock, PostgreSQL broke the deadlock
        after a second and the post was run again. The lock is now a transaction's first:
        the post waits for it holding nothing."""
        db = await open_database(self, "postgresql")
        owner = await _two_mailboxes(db)
        clock = Clock()
        clock.advance(T0)
        caps = WaitingCaps(db, clock)
        mail = MailService(db, clock, "mx.test", MailFiles(Path(self.mktemp())),
                           CpuPool.for_tests(), caps=caps)
        draft = await mail.create(owner, BOB, Edit("draft", {"to": "a@far.test"}))
        conflicts = logged(self, lambda e: "conflicted" in e.get("log_format", ""))
        moved = defer.Deferred.fromCoroutine(mail.update(
            owner, draft.public_id, Edit("outbox", {"from": OTHER}), None))
        await threads.deferToThread(caps.counted.wait, 30)
        posted = defer.Deferred.fromCoroutine(mail.create(
            owner, BOB, Edit("outbox", {"to": "b@far.test", "from": OTHER})))
        # The moved draft goes on once the post waits for the user's send-cap lock.
        waiting = sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                          "AND NOT granted")
        for _ in range(3000):
            if await db.read("waiting", lambda c: c.execute(waiting).scalar()):
                break
            await deferLater(get_reactor(), 0.01)
        else:
            self.fail("the post never came to wait for the send-cap lock")
        caps.go.set()
        written = await defer.gatherResults([moved, posted])
        self.assertEqual([w.outcome.value for w in written], ["enqueued", "enqueued"])
        self.assertEqual(conflicts, [])


class SQLiteServiceCapsTests(ServiceCapsMixin, TestCase):
    backend = "sqlite"


class PostgresServiceCapsTests(ServiceCapsMixin, TestCase):
    backend = "postgresql"


def _thd_sendable_bundle(conn: sa.Connection, owner: int) -> int:
    """An unsent bundle of `owner`'s with one recipient and one file."""
    now = datetime.datetime.fromtimestamp(T0, datetime.UTC)
    bundle = int(conn.execute(sa.insert(drop_bundles).values(
        owner_id=owner, subject="s", message="m", email_receipt_when=0, read_remove=False,
        allow_comments=False, require_token_auth=False, created_at=now,
    ).returning(drop_bundles.c.id)).scalar_one())
    conn.execute(sa.insert(drop_recipients).values(
        bundle_id=bundle, email=f"r{bundle}@far.test", telephone="", valid_for=0))
    conn.execute(sa.insert(drop_files).values(
        bundle_id=bundle, name="a.pdf", content_type="application/pdf", size=1,
        sha256="a" * 64, created_at=now))
    return bundle


class MeetingCaps(SendCaps):
    """The caps of one node whose first send, once counted (its user's lock held on
    PostgreSQL), waits for the other node's first to be counted too."""

    def __init__(self, db: Database, clock: Clock, meet: threading.Barrier) -> None:
        super().__init__(db, clock, SendCapSettings(user_recipients_per_hour=100),
                         CollectorRegistry())
        self.meet = meet
        self.met = threading.Lock()

    def thd_take(self, conn: sa.Connection, user_id: int, recipients: int,
                 now: float) -> SendVerdict:
        verdict = super().thd_take(conn, user_id, recipients, now)
        if self.met.acquire(blocking=False):  # the node's first send
            self.meet.wait()
        return verdict


class TwoNodeSendTests(TestCase):
    """Two nodes (two Database objects) on one PostgreSQL store."""

    timeout = 120

    async def test_two_nodes_sending_for_two_users_in_both_orders_both_send(self) -> None:
        """Each node sends a bundle of user X's and one of user Y's at once, node A in
        that order and node B in the other, each node's first send counted before either
        node's second is. As riders of one group commit per node, A held X's lock waiting
        for Y's and B held Y's waiting for X's: PostgreSQL broke the deadlock by failing
        one of the sends (40P01). On PostgreSQL a send is a transaction of its own: every
        send goes."""
        first = await open_database(self, "postgresql")
        second = await open_database_at(self, first.url)
        x = await first.run("user", thd_make_user, "x")
        y = await first.run("user", thd_make_user, "y")
        clock = Clock()
        clock.advance(T0)
        meet = threading.Barrier(2, timeout=30)
        nodes = []
        for n, db in enumerate((first, second)):
            spool = Spool(db, get_reactor(), QueueSettings(node_id=f"node-{n}"),
                          QueueMetrics(CollectorRegistry()))
            self.addCleanup(spool.drain)
            drops = SafedropService(
                db, clock, CpuPool.for_tests(), SecretBox(Fernet.generate_key()), spool,
                SafedropSettings(), data_dir=Path(self.mktemp()), hostname="mx.test",
                caps=MeetingCaps(db, clock, meet))
            drops.files.prepare()
            nodes.append((spool, drops))
        sends = []
        for (spool, drops), users in zip(nodes, ((x, y), (y, x)), strict=True):
            bundles = [await first.run("bundle", _thd_sendable_bundle, u) for u in users]
            # Both sends handed in while the lane is held: (before) one group commit
            # takes both, in this order.
            go = threading.Event()
            held = spool.run_serialized("hold", lambda _c, go=go: go.wait(30))
            sends += [defer.Deferred.fromCoroutine(drops.send(u, b))
                      for u, b in zip(users, bundles, strict=True)]
            go.set()
            await held
        self.assertEqual(await defer.gatherResults(sends), [1, 1, 1, 1])
        sent = await first.read("sent", lambda c: c.execute(
            sa.select(sa.func.count()).where(drop_bundles.c.sent_at.is_not(None))).scalar())
        self.assertEqual(sent, 4)
        self.assertEqual(await first.read("n", _count(api_sends)), 4)
        self.assertEqual(await first.read("n", _count(queue_messages)), 4)


class MailApiCapTests(MailApiTestCase):
    config = Config(sections={"fetch": {"allow_loopback": True},
                              "limits": {"user_recipients_per_hour": 5,
                                         "user_recipients_per_day": 0}})

    async def post(self, who: str, **fields: str) -> tuple[int, dict[str, list[str]], Any]:
        return await self.web.call("POST", "/api/v1/mail/", json={"status": "outbox", **fields},
                                   headers={"Auth-Key": self.keys[who]})

    async def test_a_send_past_the_cap_stays_a_draft_until_the_hour_has_room(self) -> None:
        warnings = logged_at(self, LogLevel.warn)
        # Three distinct recipients (a@ is in to and cc): 3 of 5.
        status, _, _ = await self.post("bob", to="a@far.test, b@far.test, c@far.test",
                                       cc="a@far.test")
        self.assertEqual(status, 202)
        self.web.clock.advance(600)
        status, headers, body = await self.post("bob", to="d@far.test",
                                                bcc="e@far.test, f@far.test")
        self.assertEqual(status, 429, body)
        self.assertEqual(body["message"], "sending limit reached: 3 of 5 recipients an hour "
                         "used, this send has 3; try again in 3000 s - stored email as draft")
        self.assertEqual(header(headers, "Retry-After"), "3000")
        draft = body["id"]
        rows = {r.public_id: r for r in await self.rows()}
        self.assertEqual((rows[draft].status, rows[draft].queue_id, rows[draft].raw),
                         ("draft", None, None))
        self.assertEqual(await self.web.core.db.read("q", _count(queue_messages)), 0)
        _, mail = await self.as_("bob", "GET", f"/api/v1/mail/{draft}")
        self.assertEqual((mail["status"], mail["bcc"]), ("draft", "e@far.test, f@far.test"))
        # Two more fit; the draft sent again is refused again (one warning for the spell).
        status, _, _ = await self.post("bob", to="g@far.test, h@far.test")
        self.assertEqual(status, 202)
        status, body = await self.as_("bob", "PUT", f"/api/v1/mail/{draft}",
                                      json={"status": "outbox", "subject": "later"})
        self.assertEqual(status, 429)
        # Another user's count is its own.
        status, _, _ = await self.post("joe", to="a@far.test, b@far.test")
        self.assertEqual(status, 202)
        # Once the first send has left the hour (at 3600 s) there is room for three.
        self.web.clock.advance(3000)
        status, body = await self.as_("bob", "PUT", f"/api/v1/mail/{draft}",
                                      json={"status": "outbox"})
        self.assertEqual((status, body["message"]), (202, "email enqueued to be sent"))
        _, mail = await self.as_("bob", "GET", f"/api/v1/mail/{draft}")
        self.assertEqual((mail["status"], mail["subject"]), ("outbox", "later"))
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn(f"user {self.users['bob'].id} (bob <bob@hosted.test>) reached its cap "
                      "on mail the APIs send: sending limit reached: 3 of 5 recipients an "
                      "hour used, this send has 3", warnings[0])
        metrics = generate_latest(self.web.core.metrics).decode()
        self.assertIn('mailcore_api_sends_refused_total{api="mailapi",window="hour"} 2.0',
                      metrics)

    async def test_a_mail_with_more_recipients_than_the_cap_is_a_400_draft(self) -> None:
        status, headers, body = await self.post(
            "bob", to=", ".join(f"r{n}@far.test" for n in range(6)))
        self.assertEqual(status, 400)
        self.assertEqual(body["message"], "too many recipients for the sending limit: 6, "
                         "over the 5 recipients an hour a user may send to - stored email "
                         "as draft")
        self.assertIsNone(header(headers, "Retry-After"))
        self.assertEqual([r.status for r in await self.rows()], ["draft"])

    async def test_safedrop_sends_count_against_the_same_cap(self) -> None:
        status, _, _ = await self.post("bob", to="a@far.test, b@far.test, c@far.test")
        self.assertEqual(status, 202)
        key = await self.web.credential(self.users["bob"])
        status, headers, _ = await self.web.call(
            "GET", "/", headers={"X-Auth-User": BOB, "X-Auth-Key": key})
        self.assertEqual(status, 204)
        token = {"X-Auth-Token": header(headers, "X-Auth-Token") or ""}
        form = {**token, "Content-Type": "application/x-www-form-urlencoded"}
        _, _, bundle = await self.web.call("POST", "/dropbundles", data=b"subject=x",
                                           headers=form)
        path = f"/dropbundles/{bundle['id']}"
        for n in range(3):
            status, _, _ = await self.web.call("POST", f"{path}/dropbundlerecipients",
                                               data=f"email=r{n}%40far.test".encode(),
                                               headers=form)
            self.assertEqual(status, 200)
        status, _, _ = await self.web.call("POST", f"{path}/dropfiles",
                                           data=multipart_file("a.txt", b"a"),
                                           headers={**token, **MULTIPART})
        self.assertEqual(status, 200)
        status, headers, body = await self.web.call("GET", f"{path}?send", headers=token)
        self.assertEqual(status, 429, body)
        self.assertEqual(body["error"], "sending limit reached: 3 of 5 recipients an hour "
                         "used, this send has 3; try again in 3600 s")
        self.assertEqual(header(headers, "Retry-After"), "3600")


class CappedFixture(SafedropFixture):
    async def start_capped(self, test: TestCase, limits: dict[str, int]) -> None:
        """Alice logged in, under these `[limits]`."""
        self.web = Web.build(Config(data_dir=Path(test.mktemp()), session_token_ttl=3600,
                                    sections={"limits": limits}))
        self.alice = await self.web.user("alice")
        self.key = await self.web.credential(self.alice)
        self.token = await self.login("alice@example.test", self.key)


class SafedropCapTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.f = CappedFixture()
        await self.f.start_capped(self, {"user_recipients_per_hour": 0,
                                         "user_recipients_per_day": 4})

    async def ready_bundle(self, recipients: int) -> int:
        bundle_id = await self.f.bundle()
        for n in range(recipients):
            status, _ = await self.f.form(
                "POST", f"/dropbundles/{bundle_id}/dropbundlerecipients",
                f"email=r{n}%40example.org")
            self.assertEqual(status, 200)
        status, _, _ = await self.f.call(
            "POST", f"/dropbundles/{bundle_id}/dropfiles", multipart_file("a.pdf", b"%PDF"),
            MULTIPART)
        self.assertEqual(status, 200)
        return bundle_id

    def sent_at(self, bundle_id: int) -> Any:
        return {r.id: r.sent_at for r in self.f.bundle_rows()}[bundle_id]

    async def test_a_send_past_the_cap_leaves_the_bundle_unsent(self) -> None:
        warnings = logged_at(self, LogLevel.warn)
        first, second = await self.ready_bundle(3), await self.ready_bundle(2)
        status, _, body = await self.f.call("GET", f"/dropbundles/{first}?send")
        self.assertEqual((status, body), (200, b"OK"))
        self.f.web.clock.advance(60)
        # A HEAD answers what the send would, counting nothing.
        status, headers, _ = await self.f.call("HEAD", f"/dropbundles/{second}?send")
        self.assertEqual((status, header(headers, "Retry-After")), (429, str(86400 - 60)))
        status, headers, body = await self.f.call("GET", f"/dropbundles/{second}?send")
        self.assertEqual(status, 429)
        self.assertEqual(body, {"error": "sending limit reached: 3 of 4 recipients a day "
                                "used, this send has 2; try again in 86340 s"})
        self.assertEqual(header(headers, "Retry-After"), "86340")
        self.assertIsNone(self.sent_at(second))
        self.assertEqual(len(self.f.spooled()), 3)
        # Still a draft: it takes changes, and goes once the day has room.
        status, _ = await self.f.form("PUT", f"/dropbundles/{second}", "subject=later")
        self.assertEqual(status, 200)
        self.f.web.clock.advance(86340)
        self.f.token = await self.f.login("alice@example.test", self.f.key)
        status, _, body = await self.f.call("GET", f"/dropbundles/{second}?send")
        self.assertEqual((status, body), (200, b"OK"))
        self.assertEqual(len(self.f.spooled()), 5)
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("(safedrop)", warnings[0])

    async def test_a_bundle_with_more_recipients_than_the_cap_is_a_400(self) -> None:
        bundle_id = await self.ready_bundle(5)
        status, headers, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual(status, 400)
        self.assertEqual(body["error"], "too many recipients for the sending limit: 5, over "
                         "the 4 recipients a day a user may send to")
        self.assertIsNone(header(headers, "Retry-After"))
        self.assertIsNone(self.sent_at(bundle_id))

    async def test_no_cap_sends_as_before(self) -> None:
        caps = self.f.web.core.send_caps
        caps.windows = SendCapSettings(0, 0).windows()
        bundle_id = await self.ready_bundle(5)
        status, _, body = await self.f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual((status, body), (200, b"OK"))
        rows = await self.f.web.core.db.read("n", _count(api_sends))
        self.assertEqual(rows, 0)
        self.assertIsNotNone(self.sent_at(bundle_id))


class LimitsTableTests(TestCase):
    def test_defaults_zero_and_bad_values(self) -> None:
        self.assertEqual(SendCapSettings.from_config({}), SendCapSettings(500, 2000))
        self.assertEqual(SendCapSettings.from_config(
            {"user_recipients_per_hour": 0}).windows(), (Window("day", 86400.0, 2000),))
        for bad in ({"user_recipients_per_hour": -1}, {"user_recipients_per_day": True},
                    {"user_recipients_per_day": 1.5}, {"user_recipients_per_day": "10"}):
            with self.assertRaises(ConfigError) as caught:
                SendCapSettings.from_config(bad)
            self.assertIn("must be a whole number from 0 (no cap)", str(caught.exception))
        with self.assertRaises(ConfigError) as caught:
            check_tables(Config(sections={"limits": {"recipients_per_hour": 5}}), Clock())
        self.assertEqual(str(caught.exception), "[limits] unknown key: recipients_per_hour")


class HttpRefusalTests(TestCase):
    def test_a_refusal_is_a_429_to_wait_or_a_400_that_never_passes(self) -> None:
        """The answer both APIs give (each in its own error's shape, as tested above)."""
        hour = Window("hour", 3600.0, 5)
        self.assertEqual(http_refusal(SendVerdict(3, hour, 4, 120)), (
            429, "sending limit reached: 4 of 5 recipients an hour used, this send has 3; "
            "try again in 120 s", {"Retry-After": "120"}))
        self.assertEqual(http_refusal(SendVerdict(6, Window("day", 86400.0, 5))), (
            400, "too many recipients for the sending limit: 6, over the 5 recipients a day "
            "a user may send to", {}))


class DocumentTests(TestCase):
    async def test_the_sends_document_the_cap_and_its_429(self) -> None:
        web = Web.build()
        _, _, doc = await web.call("GET", "/openapi.json")
        for path, method in (("/api/v1/mail/", "post"), ("/api/v1/mail/{mail_id}", "put"),
                             ("/dropbundles/{bundle_id}", "get")):
            op = doc["paths"][path][method]
            self.assertIn("`[limits]` caps", op["description"], path)
            refusal = op["responses"]["429"]
            self.assertIn("cap on recipients", refusal["description"], path)
            self.assertIn("Retry-After", refusal["headers"])
        written = doc["paths"]["/api/v1/mail/"]["post"]["responses"]["429"]
        self.assertIn("id", written["content"]["application/json"]["schema"]["properties"])
