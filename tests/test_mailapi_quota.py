"""`[mailapi] mailbox_quota_bytes`: a mailbox's mail (drafts, uploads, sent and received
mail) takes at most that many bytes. `mailboxes.used_bytes` is kept by every write in its
transaction: a write past the quota stores nothing (507 through the API, its upload taken
back), a delete frees what the mail took, and writes at once never pass the quota together
(SQLite and PostgreSQL, including a charge committed on another connection while a write is
under way)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, cast

from sqlalchemy import event, func, select, update
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailcore.config import Config, ConfigError
from mailcore.mailapi import QUOTA, MailApiError
from mailcore.mailapi.counts import mail_size
from mailcore.mailapi.files import MailFiles
from mailcore.mailapi.mail import Edit, MailService
from mailcore.mailapi.settings import MailApiSettings
from mailcore.store.schema import mailapi_mail, mailboxes
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin
from tests.support.mailsink import add_hosted_mailbox
from tests.test_mailapi_mail import BOB, JOE, MailApiTestCase, multipart

QUOTA_BYTES = 10_000
BOX = "bob@hosted.test"


class QuotaSettingsTests(TestCase):
    def test_default_and_no_limit(self) -> None:
        self.assertEqual(MailApiSettings().mailbox_quota_bytes, 1024 ** 3)
        self.assertIsNone(MailApiSettings.from_config({"mailbox_quota_bytes": 0})
                          .mailbox_quota_bytes)
        self.assertEqual(MailApiSettings.from_config({"mailbox_quota_bytes": 5})
                         .mailbox_quota_bytes, 5)
        for bad in (-1, True, "1G", 1.5):
            with self.assertRaises(ConfigError):
                MailApiSettings.from_config({"mailbox_quota_bytes": bad})


class QuotaApiTests(MailApiTestCase):
    config = Config(sections={"fetch": {"allow_loopback": True},
                              "mailapi": {"mailbox_quota_bytes": QUOTA_BYTES}})

    async def used(self, box: str = BOB, quota: int | None = QUOTA_BYTES) -> int:
        status, body = await self.as_("bob" if box == BOB else "joe", "GET",
                                      f"/api/v1/mailboxes/{box}")
        self.assertEqual(status, 200)
        self.assertEqual(body["quota_bytes"], quota)
        return int(body["used_bytes"])

    async def sizes(self) -> int:
        return sum(row.size for row in await self.rows())

    async def post_file(self, data: bytes, status: str = "draft") -> tuple[int, Any]:
        body, headers = multipart({"status": status, "to": JOE, "subject": "file"},
                                  "attachment", "a.bin", data,
                                  "application/octet-stream")
        return await self.as_("bob", "POST", "/api/v1/mail/", data=body, headers=headers)

    async def test_an_upload_past_the_quota_is_507_and_leaves_nothing(self) -> None:
        status, body = await self.post_file(b"a" * 6000)
        self.assertEqual(status, 201)
        used = await self.used()
        self.assertEqual(used, 6000 + mail_size([BOB, JOE, "file"]))
        self.assertEqual(used, await self.sizes())
        status, body = await self.post_file(b"b" * 6000)
        self.assertEqual(status, 507)
        self.assertEqual(list(body), ["message"])
        self.assertTrue(body["message"].startswith(f"mailbox full: {BOB} has no room"),
                        body)
        self.assertEqual(len(await self.rows()), 1)
        self.assertEqual(len(await self.attachment_rows()), 1)
        self.assertEqual(len(self.files.hashes()), 1)  # the refused upload's file is gone
        self.assertEqual(await self.used(), used)
        # A mail without attachments that still fits is kept.
        status, _ = await self.as_("bob", "POST", "/api/v1/mail/",
                                   json={"status": "draft", "subject": "small"})
        self.assertEqual(status, 201)
        self.assertEqual(await self.used(), await self.sizes())

    async def test_a_delete_frees_what_the_mail_took(self) -> None:
        status, _ = await self.post_file(b"a" * 6000)
        self.assertEqual(status, 201)
        [row] = await self.rows()
        self.assertEqual((await self.as_("bob", "DELETE", f"/api/v1/mail/{row.public_id}"))[0],
                         202)
        self.assertEqual(await self.used(), 0)
        self.assertEqual((await self.post_file(b"b" * 6000))[0], 201)

    async def test_an_edit_growing_a_draft_past_the_quota_is_507(self) -> None:
        status, body = await self.post_file(b"a" * 6000)
        draft = body["id"]
        used = await self.used()
        data, headers = multipart({"subject": "more"}, "attachment", "b.bin", b"b" * 5000,
                                  "application/octet-stream")
        status, body = await self.as_("bob", "PUT", f"/api/v1/mail/{draft}", data=data,
                                      headers=headers)
        self.assertEqual(status, 507)
        self.assertEqual(len(await self.attachment_rows()), 1)
        self.assertEqual([r.subject for r in await self.rows()], ["file"])
        self.assertEqual(await self.used(), used)
        # A smaller body gives bytes back; a larger one within the quota takes them.
        status, _ = await self.as_("bob", "PUT", f"/api/v1/mail/{draft}",
                                   json={"subject": ""})
        self.assertEqual(status, 200)
        self.assertEqual(await self.used(), used - len("file"))
        status, _ = await self.as_("bob", "PUT", f"/api/v1/mail/{draft}",
                                   json={"body": "é" * 100})
        self.assertEqual(status, 200)
        self.assertEqual(await self.used(), used - len("file") + 200)
        self.assertEqual(await self.used(), await self.sizes())

    async def test_sent_mail_counts_its_message_in_the_mailbox_it_is_sent_from(self) -> None:
        await self.grant(JOE, "bob", allow_read=True, allow_send=True)
        status, _ = await self.as_("bob", "POST", "/api/v1/mail/", json={
            "status": "outbox", "from": JOE, "to": BOB, "subject": "hi", "body": "x" * 100})
        self.assertEqual(status, 202)
        [row] = await self.rows()
        self.assertEqual(row.size, mail_size([JOE, BOB, "hi", "x" * 100]) + len(row.raw))
        self.assertEqual((await self.used(BOB), await self.used(JOE)), (0, row.size))
        # A sent message built past the quota is sent: the mailbox then takes no new mail.
        status, _ = await self.as_("bob", "POST", "/api/v1/mail/", json={
            "status": "outbox", "from": JOE, "to": BOB, "body": "y" * (QUOTA_BYTES - 1000)})
        self.assertEqual(status, 202)
        self.assertGreater(await self.used(JOE), QUOTA_BYTES)
        status, _ = await self.as_("bob", "POST", "/api/v1/mail/", json={
            "status": "draft", "from": JOE, "body": "z"})
        self.assertEqual(status, 507)
        self.assertEqual(await self.used(JOE), await self.sizes())

    async def test_a_mailboxs_own_quota_replaces_the_configured_one(self) -> None:
        # The operator's `mailcore mailbox quota`: more room for one mailbox, none, or no
        # limit; the others keep [mailapi] mailbox_quota_bytes.
        boxes = self.web.core.mailboxes
        await boxes.set_quota(BOB, 20_000)
        status, _ = await self.post_file(b"a" * 15_000)
        self.assertEqual(status, 201)  # past the configured 10000, within its own
        self.assertGreater(await self.used(quota=20_000), QUOTA_BYTES)
        _, listed = await self.as_("bob", "GET", "/api/v1/mailboxes/")
        self.assertEqual({b["email"]: b["quota_bytes"] for b in listed["mailboxes"]},
                         {BOB: 20_000})
        status, body = await self.post_file(b"b" * 6000)
        self.assertEqual(status, 507)
        self.assertIn("(quota 20000 bytes)", body["message"])
        await boxes.set_quota(BOB, 0)  # no limit
        status, _ = await self.post_file(b"c" * 6000)
        self.assertEqual(status, 201)
        await self.used(quota=None)
        await boxes.set_quota(BOB, None)  # the configured one again: over it, nothing new
        status, _ = await self.post_file(b"d")
        self.assertEqual(status, 507)
        used = await self.used()
        self.assertEqual(used, await self.sizes())
        before = len(await self.rows())
        await self.deliver(1)  # received mail too
        self.assertEqual(len(await self.rows()), before)
        # And the RCPT check's read of the mailboxes' room follows it.
        from mailcore.mailapi.room import thd_nearly_full

        db = self.web.core.db
        self.assertEqual(await db.read("room", thd_nearly_full, QUOTA_BYTES, 1000),
                         {BOB: QUOTA_BYTES - used})
        await boxes.set_quota(BOB, 0)
        self.assertEqual(await db.read("room", thd_nearly_full, QUOTA_BYTES, 1000), {})
        self.assertEqual(await db.read("room", thd_nearly_full, None, 1000), {})
        await boxes.set_quota(BOB, used + 10)
        self.assertEqual(await db.read("room", thd_nearly_full, None, 1000), {BOB: 10})
        with self.assertRaises(MailApiError):
            await boxes.set_quota(BOB, -1)

    async def test_received_mail_counts_and_stops_at_the_quota(self) -> None:
        n = 0
        while True:
            n += 1
            before = len(await self.rows())
            await self.deliver(n)
            if len(await self.rows()) == before:
                break
        self.assertGreater(n, 2)
        self.assertLessEqual(await self.used(), QUOTA_BYTES)
        self.assertEqual(await self.used(), await self.sizes())


class DraftCapTests(MailApiTestCase):
    """`[mailapi] max_drafts_per_mailbox`: an empty draft takes no byte of the quota, so a
    client could add them without end; a mailbox holds at most that many drafts."""

    config = Config(sections={"fetch": {"allow_loopback": True},
                              "mailapi": {"max_drafts_per_mailbox": 2}})

    def test_the_setting(self) -> None:
        self.assertEqual(MailApiSettings().max_drafts_per_mailbox, 10_000)
        self.assertIsNone(MailApiSettings.from_config({"max_drafts_per_mailbox": 0})
                          .max_drafts_per_mailbox)
        for bad in (-1, True, "10", 1.5):
            with self.assertRaises(ConfigError):
                MailApiSettings.from_config({"max_drafts_per_mailbox": bad})

    async def test_a_draft_past_the_cap_is_507_and_stores_nothing(self) -> None:
        for _ in range(2):
            status, _ = await self.as_("bob", "POST", "/api/v1/mail/", json={"status": "draft"})
            self.assertEqual(status, 201)
        full = {"message": f"mailbox full: {BOB} holds 2 drafts, and [mailapi] "
                           "max_drafts_per_mailbox allows 2; send or delete drafts - email "
                           "not saved"}
        # A new draft, and a mail asked for the outbox that cannot go (no "to") and would
        # stay a draft, are refused.
        for mail in ({"status": "draft"}, {"status": "outbox", "subject": "no one"}):
            status, body = await self.as_("bob", "POST", "/api/v1/mail/", json=mail)
            self.assertEqual((status, body), (507, full), mail)
        rows = await self.rows()
        self.assertEqual(len(rows), 2)
        # A draft deleted frees its place.
        status, _ = await self.as_("bob", "DELETE", f"/api/v1/mail/{rows[0].public_id}")
        self.assertEqual(status, 202)
        status, _ = await self.as_("bob", "POST", "/api/v1/mail/", json={"status": "draft"})
        self.assertEqual(status, 201)

    async def test_a_mailbox_full_of_drafts_still_sends_and_edits_its_drafts(self) -> None:
        """A new mail sent at once never stays a draft: a mailbox holding the most drafts
        still sends new mail, and an edit of a draft adds none."""
        for _ in range(2):
            status, _ = await self.as_("bob", "POST", "/api/v1/mail/", json={"status": "draft"})
            self.assertEqual(status, 201)
        status, body = await self.as_("bob", "POST", "/api/v1/mail/",
                                      json={"status": "outbox", "to": JOE, "subject": "s"})
        self.assertEqual(status, 202, body)
        rows = await self.rows()
        self.assertEqual([r.status for r in rows], ["draft", "draft", "outbox"])
        status, body = await self.as_("bob", "PUT", f"/api/v1/mail/{rows[0].public_id}",
                                      json={"subject": "edited"})
        self.assertEqual(status, 200, body)
        status, body = await self.as_("bob", "PUT", f"/api/v1/mail/{rows[1].public_id}",
                                      json={"status": "outbox", "to": JOE})
        self.assertEqual(status, 202, body)
        self.assertEqual([r.status for r in await self.rows()], ["draft", "outbox", "outbox"])
        status, _ = await self.as_("bob", "POST", "/api/v1/mail/", json={"status": "draft"})
        self.assertEqual(status, 201)
        status, _ = await self.as_("bob", "POST", "/api/v1/mail/", json={"status": "draft"})
        self.assertEqual(status, 507)


class QuotaRaceMixin(DatabaseMixin):
    """Writes at once into one mailbox, on the store's thread pool (PostgreSQL: on
    connections of their own, truly at once)."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.db = await self.open_database()
        self.bob = await add_hosted_mailbox(self.db, BOX)
        self.mail = MailService(self.db, Clock(), "mx.test", MailFiles(Path(self.mktemp())),
                                CpuPool.for_tests(), quota_bytes=QUOTA_BYTES)
        self.mail.files.prepare()

    async def usage(self) -> tuple[int, int, int]:
        """used_bytes, the sum of the mail's sizes, how many mails."""
        return tuple(await self.db.read("usage", lambda c: (  # type: ignore[return-value]
            c.execute(select(mailboxes.c.used_bytes)).scalar_one(),
            c.execute(select(func.coalesce(func.sum(mailapi_mail.c.size), 0))).scalar_one(),
            c.execute(select(func.count()).select_from(mailapi_mail)).scalar_one())))

    async def twelve_drafts_at_once(self, fields: dict[str, str]) -> int:
        """Twelve new drafts of `fields` at once; how many were refused (each a QUOTA)."""
        results = await defer.DeferredList(
            [defer.Deferred.fromCoroutine(self.mail.create(self.bob, BOX, Edit("draft", fields)))
             for _ in range(12)], consumeErrors=True)
        refused = [cast(Failure, r) for ok, r in results if not ok]
        for failure in refused:
            failure.trap(MailApiError)
            self.assertEqual(cast(MailApiError, failure.value).kind, QUOTA)
        return len(refused)

    async def test_writes_at_once_never_pass_the_quota_together(self) -> None:
        body = "x" * 2000  # each draft takes 2000 + len(BOX) bytes: four fit, not five
        self.assertEqual(await self.twelve_drafts_at_once({"body": body}), 8)
        self.assertEqual(await self.usage(), (4 * (2000 + len(BOX)),) * 2 + (4,))

    async def test_drafts_at_once_never_pass_the_cap_together(self) -> None:
        self.mail.max_drafts = 4
        self.assertEqual(await self.twelve_drafts_at_once({}), 8)
        self.assertEqual((await self.usage())[2], 4)


class SQLiteQuotaRaceTests(QuotaRaceMixin, TestCase):
    backend = "sqlite"


class PostgreSQLQuotaRaceTests(QuotaRaceMixin, TestCase):
    backend = "postgresql"

    async def test_a_charge_committed_meanwhile_is_seen(self) -> None:
        # Another write (another node) fills the mailbox and commits after this create read
        # the mailbox and holds it: the create's check sees the committed bytes, not those
        # it read. (A read-then-write check would store past the quota.)
        done = threading.Event()
        started: list[threading.Thread] = []

        def fill() -> None:
            try:
                with self.db.engine.begin() as other:
                    other.execute(update(mailboxes).values(used_bytes=QUOTA_BYTES - 10))
            finally:
                done.set()

        def meanwhile(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if started or "FOR KEY SHARE" not in statement:
                return
            started.append(threading.Thread(target=fill))
            started[0].start()
            done.wait(5)

        event.listen(self.db.engine, "after_cursor_execute", meanwhile)
        self.addCleanup(event.remove, self.db.engine, "after_cursor_execute", meanwhile)
        with self.assertRaises(MailApiError) as refused:
            await self.mail.create(self.bob, BOX, Edit("draft", {"body": "x" * 100}))
        self.assertEqual(refused.exception.kind, QUOTA)
        self.assertTrue(started)
        started[0].join()
        self.assertEqual(await self.usage(), (QUOTA_BYTES - 10, 0, 0))




class MailboxRoomMixin(DatabaseMixin):
    """The RCPT check's view of the mailboxes' room (mailcore.mailapi.room): one read for
    every RCPT within its TTL, the nearly full mailboxes only, a failed read accepting."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.db = await self.open_database()
        await add_hosted_mailbox(self.db, BOX)
        self.clock = Clock()
        self.reads = 0
        read = self.db.read

        def counted(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
            self.reads += 1
            return read(name, fn, *args, **kwargs)

        self.db.read = counted  # type: ignore[method-assign]

    async def use(self, used: int) -> None:
        await self.db.run("use", lambda c: c.execute(
            update(mailboxes).values(used_bytes=used)))

    async def test_room_is_read_once_a_ttl_and_only_when_short(self) -> None:
        from mailcore.mailapi.room import MailboxRoom

        room = MailboxRoom(self.db, self.clock, QUOTA_BYTES, margin=1000, ttl=10.0)
        await self.use(8000)  # 2000 left: more than the margin
        self.assertIsNone(await room.room(BOX))
        await self.use(9990)
        self.assertIsNone(await room.room("Bob@Hosted.TEST"))  # (still the read before)
        self.assertEqual(self.reads, 1)
        self.clock.advance(10)
        self.assertEqual(await room.room("Bob@Hosted.TEST"), 10)
        self.assertIsNone(await room.room("nobody@hosted.test"))
        self.assertEqual(self.reads, 2)
        await self.use(QUOTA_BYTES + 500)  # passed by mail sent from it
        self.clock.advance(10)
        self.assertEqual(await room.room(BOX), -500)

    async def test_no_limit_and_a_failed_read_accept(self) -> None:
        from mailcore.mailapi.room import MailboxRoom

        await self.use(QUOTA_BYTES)
        self.assertIsNone(await MailboxRoom(self.db, self.clock, None, 1000).room(BOX))
        self.reads = 0
        room = MailboxRoom(self.db, self.clock, QUOTA_BYTES, 1000)

        def broken(name: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
            self.reads += 1
            return defer.fail(RuntimeError("store down"))

        self.db.read = broken  # type: ignore[method-assign]
        self.assertIsNone(await room.room(BOX))
        self.assertIsNone(await room.room(BOX))  # not read again by every RCPT
        self.assertEqual(self.reads, 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SQLiteMailboxRoomTests(MailboxRoomMixin, TestCase):
    backend = "sqlite"


class PostgreSQLMailboxRoomTests(MailboxRoomMixin, TestCase):
    backend = "postgresql"

    async def test_own_quotas_on_the_real_server(self) -> None:
        from mailcore.mailapi.room import thd_nearly_full

        await self.use(9990)
        self.assertEqual(await self.db.read("r", thd_nearly_full, QUOTA_BYTES, 1000), {BOX: 10})
        await self.db.run("own", lambda c: c.execute(update(mailboxes).values(quota_bytes=0)))
        self.assertEqual(await self.db.read("r", thd_nearly_full, QUOTA_BYTES, 1000), {})
        await self.db.run("own", lambda c: c.execute(
            update(mailboxes).values(quota_bytes=10_500)))
        self.assertEqual(await self.db.read("r", thd_nearly_full, None, 1000), {BOX: 510})
