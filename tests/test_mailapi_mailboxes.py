"""Mail API mailboxes and grants (seed 002 `/api/v1/mailboxes/…`) through the real web root
on an in-memory store: who sees which mailbox, who changes grants, and that nobody grants
more than it holds."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from sqlalchemy import delete, event, func, insert, select, update
from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.mailapi import RIGHTS, MailApiError, MailboxService
from mailcore.mailapi.addresses import mailbox_key
from mailcore.mailapi.delivery import LocalMailboxes
from mailcore.mailapi.errors import CONFLICT
from mailcore.mailapi.files import MailFiles
from mailcore.mailapi.mail import Edit, MailService, Outcome
from mailcore.mailapi.mailboxes import Grant, OutboxNotEmpty
from mailcore.mailapi.outbox import thd_mark_sent, thd_outbox, thd_take
from mailcore.store.schema import mailapi_mail, mailbox_grants, mailboxes, users
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user
from tests.support.mailsink import add_hosted_mailbox
from tests.support.web import PASSWORD, Web

BOX = "bob@hosted.test"
NONE = {r: False for r in RIGHTS}
EVERY = {r: True for r in RIGHTS}


class MailboxApiTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.web = Web.build()
        self.bob = await self.web.user("bob")
        self.joe = await self.web.user("joe")
        self.eve = await self.web.user("eve")
        await self.web.core.domains.add("hosted.test", self.bob.id, "mx.hosted.test")
        await self.web.core.mailboxes.add("Bob@Hosted.TEST", self.bob.id)
        self.keys = {name: await self.login(name) for name in ("bob", "joe", "eve")}

    async def login(self, name: str) -> str:
        status, _, body = await self.web.call(
            "POST", "/api/v1/auth/", json={"username": name, "password": PASSWORD})
        self.assertEqual(status, 200)
        return str(body["auth_key"])

    async def as_(self, who: str, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        status, _, body = await self.web.call(
            method, path, headers={"Auth-Key": self.keys[who]}, **kwargs)
        return status, body

    async def grant(self, who: str, to: str, **rights: bool) -> tuple[int, Any]:
        return await self.as_(who, "PUT", f"/api/v1/mailboxes/{BOX}/access/{to}", json=rights)

    async def test_the_owner_sees_its_mailbox_with_every_right(self) -> None:
        status, body = await self.as_("bob", "GET", "/api/v1/mailboxes/")
        self.assertEqual((status, body), (200, {"mailboxes": [
            {"email": BOX, "owner": "bob", "is_owner": True, "active": True,
             "used_bytes": 0, "quota_bytes": 1024 ** 3, **EVERY}]}))

    async def test_a_mailbox_without_a_grant_is_invisible(self) -> None:
        self.assertEqual(await self.as_("joe", "GET", "/api/v1/mailboxes/"),
                         (200, {"mailboxes": []}))
        for method, path in [
            ("GET", f"/api/v1/mailboxes/{BOX}"),
            ("DELETE", f"/api/v1/mailboxes/{BOX}"),
            ("GET", f"/api/v1/mailboxes/{BOX}/access/"),
            ("GET", f"/api/v1/mailboxes/{BOX}/access/joe"),
            ("DELETE", f"/api/v1/mailboxes/{BOX}/access/eve"),
            ("GET", "/api/v1/mailboxes/nobody@hosted.test"),
            ("GET", "/api/v1/mailboxes/not-an-address"),
        ]:
            self.assertEqual(await self.as_("joe", method, path),
                             (404, {"message": "mailbox not found"}), (method, path))
        status, body = await self.grant("joe", "joe", allow_read=True)
        self.assertEqual((status, body), (404, {"message": "mailbox not found"}))

    async def test_without_a_key_it_is_401(self) -> None:
        status, _, body = await self.web.call("GET", "/api/v1/mailboxes/")
        self.assertEqual((status, body), (401, {"message": "unauthorized"}))

    async def test_a_grant_makes_the_mailbox_visible_with_those_rights(self) -> None:
        status, body = await self.grant("bob", "joe", allow_read=True, allow_send=True)
        self.assertEqual(status, 200)
        self.assertEqual(body, {"message": "access updated", "username": "joe",
                                "is_owner": False,
                                **{**NONE, "allow_read": True, "allow_send": True}})
        status, body = await self.as_("joe", "GET", "/api/v1/mailboxes/")
        self.assertEqual(body["mailboxes"], [
            {"email": BOX, "owner": "bob", "is_owner": False, "active": True,
             "used_bytes": 0, "quota_bytes": 1024 ** 3,
             **{**NONE, "allow_read": True, "allow_send": True}}])
        # Its own rights it may read; the list of everyone's it may not.
        self.assertEqual((await self.as_("joe", "GET",
                                         f"/api/v1/mailboxes/{BOX}/access/joe"))[0], 200)
        self.assertEqual(await self.as_("joe", "GET", f"/api/v1/mailboxes/{BOX}/access/"),
                         (401, {"message": "you may not change access to this mailbox"}))

    async def test_the_access_list_names_the_mailbox_as_it_is_stored(self) -> None:
        # It echoed the path lower-cased: an internationalised domain's U-label (and any
        # other spelling normalise_address would store differently), where GET
        # /api/v1/mailboxes/ shows the mailbox by its stored A-label (found by an audit).
        await self.web.core.domains.add("bücher.test", self.bob.id, "mx.hosted.test")
        await self.web.core.mailboxes.add("bob@bücher.test", self.bob.id)
        status, body = await self.as_("bob", "GET", "/api/v1/mailboxes/")
        self.assertIn("bob@xn--bcher-kva.test", [m["email"] for m in body["mailboxes"]])
        status, body = await self.as_("bob", "GET",
                                      "/api/v1/mailboxes/Bob%40B%C3%9CCHER.test/access/")
        self.assertEqual((status, body["email"]), (200, "bob@xn--bcher-kva.test"))

    async def test_a_grantee_cannot_tell_which_usernames_exist(self) -> None:
        await self.grant("bob", "joe", allow_read=True, allow_send=True, allow_reply_to=True,
                         allow_delete=True)
        denied = (401, {"message": "you may not change access to this mailbox"})
        for name in ("eve", "nobody"):  # a user, and no user: the same answer
            self.assertEqual(await self.as_("joe", "GET", f"/api/v1/mailboxes/{BOX}/access/"
                                            f"{name}"), denied, name)
        self.assertEqual((await self.as_("joe", "GET",
                                         f"/api/v1/mailboxes/{BOX}/access/joe"))[0], 200)
        # The owner (as a holder of allow_modify) is told the user is unknown.
        self.assertEqual(await self.as_("bob", "GET", f"/api/v1/mailboxes/{BOX}/access/nobody"),
                         (404, {"message": "user not found"}))
        await self.grant("bob", "joe", allow_modify=True)
        self.assertEqual(await self.as_("joe", "GET", f"/api/v1/mailboxes/{BOX}/access/nobody"),
                         (404, {"message": "user not found"}))

    async def test_form_booleans_are_0_and_1_and_absent_rights_keep_their_value(self) -> None:
        await self.grant("bob", "joe", allow_read=True)
        status, _, body = await self.web.call(
            "PUT", f"/api/v1/mailboxes/{BOX}/access/joe", headers={"Auth-Key": self.keys["bob"]},
            data={"allow_delete": "1", "allow_read": "0"})
        self.assertEqual(status, 200)
        self.assertEqual({r: body[r] for r in RIGHTS},
                         {**NONE, "allow_delete": True})

    async def test_a_grant_of_no_right_is_no_grant(self) -> None:
        # A PUT naming no right stored a row of none, which the access list then showed
        # (and a DELETE removed, where it answers 404 "user has no access" to a user with
        # none). A grant left with no right is removed, as a revoke.
        listed = f"/api/v1/mailboxes/{BOX}/access/"

        async def names() -> list[str]:
            status, body = await self.as_("bob", "GET", listed)
            self.assertEqual(status, 200, body)
            return [g["username"] for g in body["access"]]

        for body in ({}, {"allow_read": False}, {"allow_read": False, "allow_send": False}):
            self.assertEqual(await self.as_("bob", "PUT", listed + "joe", json=body),
                             (200, {"message": "access updated", "username": "joe",
                                    "is_owner": False, **NONE}), body)
            self.assertEqual(await names(), ["bob"])
        status, _, reply = await self.web.call(
            "PUT", listed + "joe", headers={"Auth-Key": self.keys["bob"]}, data={})
        self.assertEqual((status, {r: reply[r] for r in RIGHTS}), (200, NONE))
        self.assertEqual(await names(), ["bob"])
        self.assertEqual(await self.as_("bob", "DELETE", listed + "joe"),
                         (404, {"message": "user has no access to this mailbox"}))
        # A grantee's rights are kept by an empty PUT, and taken all away by one setting
        # each to false: the user is off the list and no longer sees the mailbox.
        await self.grant("bob", "joe", allow_read=True, allow_send=True)
        status, body = await self.grant("bob", "joe")
        self.assertEqual({r: body[r] for r in RIGHTS},
                         {**NONE, "allow_read": True, "allow_send": True})
        self.assertEqual(await names(), ["bob", "joe"])
        status, body = await self.grant("bob", "joe", allow_send=False)
        self.assertEqual(await names(), ["bob", "joe"])
        status, body = await self.grant("bob", "joe", allow_read=False)
        self.assertEqual((status, {r: body[r] for r in RIGHTS}), (200, NONE))
        self.assertEqual(await names(), ["bob"])
        self.assertEqual((await self.as_("joe", "GET", "/api/v1/mailboxes/"))[1],
                         {"mailboxes": []})
        self.assertEqual(await self.as_("bob", "GET", listed + "joe"),
                         (200, {"username": "joe", "is_owner": False, **NONE}))
        # A row of no rights stored before is no grant either: not listed.
        await self.web.core.db.run("row", lambda c: c.execute(insert(mailbox_grants).values(
            mailbox_id=c.execute(select(mailboxes.c.id)).scalar_one(),
            user_id=self.eve.id, **NONE)))
        self.assertEqual(await names(), ["bob"])

    async def test_bad_grant_input(self) -> None:
        status, body = await self.grant("bob", "joe", allow_read="maybe")  # type: ignore[arg-type]
        self.assertEqual(status, 400)
        self.assertIn("allow_read", body["message"])
        status, body = await self.grant("bob", "joe", allow_everything=True)
        self.assertEqual((status, body), (400, {"message": "unknown field: allow_everything"}))
        self.assertEqual(await self.grant("bob", "nobody", allow_read=True),
                         (404, {"message": "user not found"}))
        self.assertEqual(await self.grant("bob", "bob", allow_read=False),
                         (400, {"message": "the owner holds every right on its mailbox"}))
        # Nothing was stored by any of them.
        status, body = await self.as_("bob", "GET", f"/api/v1/mailboxes/{BOX}/access/")
        self.assertEqual([g["username"] for g in body["access"]], ["bob"])

    async def test_only_the_owner_or_allow_modify_changes_grants(self) -> None:
        await self.grant("bob", "joe", allow_read=True, allow_send=True, allow_reply_to=True,
                         allow_delete=True)
        # Without allow_modify, joe changes nothing, not even its own grant.
        self.assertEqual(await self.grant("joe", "eve", allow_read=True),
                         (401, {"message": "you may not change access to this mailbox"}))
        self.assertEqual(await self.grant("joe", "joe", allow_modify=True),
                         (401, {"message": "you may not change access to this mailbox"}))
        status, _ = await self.as_("joe", "DELETE", f"/api/v1/mailboxes/{BOX}/access/joe")
        self.assertEqual(status, 401)
        # With it, joe grants what it holds...
        await self.grant("bob", "joe", allow_modify=True, allow_delete=False)
        status, body = await self.grant("joe", "eve", allow_read=True, allow_send=True)
        self.assertEqual(status, 200)
        # ...but not a right it lacks.
        self.assertEqual(await self.grant("joe", "eve", allow_delete=True),
                         (401, {"message": "you may not grant allow_delete"}))
        status, body = await self.as_("joe", "GET", f"/api/v1/mailboxes/{BOX}/access/eve")
        self.assertFalse(body["allow_delete"])
        # It may take rights away and remove a user from the list.
        self.assertEqual((await self.grant("joe", "eve", allow_send=False))[0], 200)
        self.assertEqual(await self.as_("joe", "DELETE", f"/api/v1/mailboxes/{BOX}/access/eve"),
                         (200, {"message": "access removed"}))
        self.assertEqual(await self.as_("eve", "GET", "/api/v1/mailboxes/"),
                         (200, {"mailboxes": []}))
        self.assertEqual(await self.as_("joe", "DELETE", f"/api/v1/mailboxes/{BOX}/access/eve"),
                         (404, {"message": "user has no access to this mailbox"}))
        status, body = await self.as_("joe", "GET", f"/api/v1/mailboxes/{BOX}/access/")
        self.assertEqual(status, 200)
        self.assertEqual([(g["username"], g["is_owner"]) for g in body["access"]],
                         [("bob", True), ("joe", False)])

    async def test_only_the_owner_deletes_the_mailbox(self) -> None:
        await self.grant("bob", "joe", **EVERY)
        self.assertEqual(await self.as_("joe", "DELETE", f"/api/v1/mailboxes/{BOX}"),
                         (401, {"message": "only the owner may delete this mailbox"}))
        status, _, body = await self.web.call(
            "DELETE", f"/api/v1/mailboxes/{BOX}", headers={"Auth-Key": self.keys["bob"]})
        self.assertEqual((status, body), (200, {"message": "mailbox deleted"}))
        self.assertEqual(await self.as_("joe", "GET", "/api/v1/mailboxes/"),
                         (200, {"mailboxes": []}))
        self.assertEqual(await self.web.core.mailboxes.list_all(), [])

    async def test_a_mailbox_with_mail_waiting_to_be_sent_is_not_deleted(self) -> None:
        # joe's 202 says the mail will be sent: bob's delete may not take it along (found
        # by an audit: every outbox row went with the mailbox). No sender runs here.
        await self.grant("bob", "joe", allow_send=True)
        status, _ = await self.as_("joe", "POST", "/api/v1/mail/", json={
            "status": "outbox", "from": BOX, "to": "x@customer.test", "subject": "hi"})
        self.assertEqual(status, 202)
        self.assertEqual(await self.as_("bob", "DELETE", f"/api/v1/mailboxes/{BOX}"), (409, {
            "message": "this mailbox has mail waiting to be sent; delete it once its outbox "
                       "is empty"}))
        self.assertEqual([b.address for b in await self.web.core.mailboxes.list_all()], [BOX])

    async def test_the_operator_removes_a_mailbox_with_outbox_mail_only_by_force(self) -> None:
        # `mailcore mailbox remove` deleted mail answered 202 along with its mailbox
        # (found by an audit); it says how many wait, and --force deletes them unsent.
        await self.grant("bob", "joe", allow_send=True)
        for n in range(2):
            status, _ = await self.as_("joe", "POST", "/api/v1/mail/", json={
                "status": "outbox", "from": BOX, "to": f"x{n}@customer.test"})
            self.assertEqual(status, 202)
        boxes = self.web.core.mailboxes
        with self.assertRaises(OutboxNotEmpty) as refused:
            await boxes.remove(BOX)
        self.assertEqual((refused.exception.kind, refused.exception.waiting,
                          refused.exception.message),
                         (CONFLICT, 2, f"mailbox {BOX} has 2 mails waiting to be sent"))
        self.assertEqual([b.address for b in await boxes.list_all()], [BOX])
        self.assertEqual(await boxes.remove(BOX, force=True), 2)
        self.assertEqual(await boxes.list_all(), [])


class MailboxServiceTests(TestCase):
    async def test_a_mailbox_needs_a_served_domain_and_a_valid_new_address(self) -> None:
        web = Web.build()
        bob = await web.user("bob")
        await web.core.domains.add("hosted.test", bob.id, "mx.hosted.test")
        service = web.core.mailboxes
        for address, kind, words in [
            ("bob@elsewhere.test", "invalid", "not a served domain"),
            ("bob", "invalid", "not an email address"),
            ("bo b@hosted.test", "invalid", "dot-atom"),
            ("bob@hosted.test\r\nX: y", "invalid", "not an email address"),
            # A dot-atom spelling an RFC 2047 word: mail sent from it could not be built
            # (its From decodes to CR LF), or would show "Your account" as its address.
            ("=?utf-8?q?=0d=0a?=@hosted.test", "invalid", "RFC 2047"),
            ("=?utf-8?q?Your_account?=@hosted.test", "invalid", "RFC 2047"),
        ]:
            with self.assertRaises(MailApiError) as caught:
                await service.add(address, bob.id)
            self.assertEqual(caught.exception.kind, kind, address)
            self.assertIn(words, caught.exception.message, address)
        await service.add("bob@hosted.test", bob.id)
        with self.assertRaises(MailApiError) as caught:
            await service.add("BOB@hosted.test", bob.id)
        self.assertEqual(caught.exception.kind, "conflict")
        self.assertEqual([b.address for b in await service.list_all(bob.id)],
                         ["bob@hosted.test"])

    async def test_a_mailbox_added_before_encoded_words_were_refused_is_still_used(
            self) -> None:
        # A mailbox added when its address (a local part spelling an RFC 2047 word) was
        # still taken: the queue routes its mail by mailbox_key (it must not be routed as
        # not hosted), and its owner and the operator still find it (to read its mail, to
        # remove it); no new one is taken.
        self.assertEqual(mailbox_key("=?utf-8?q?Hi?=@Hosted.test"), "=?utf-8?q?hi?=@hosted.test")
        web = Web.build()
        bob = await web.user("bob")
        await web.core.domains.add("hosted.test", bob.id, "mx.hosted.test")
        service = web.core.mailboxes
        await service.add("bob@hosted.test", bob.id)
        old = "=?utf-8?q?=0d=0a?=@hosted.test"
        await web.core.db.run("before", lambda c: c.execute(
            update(mailboxes).where(mailboxes.c.address == "bob@hosted.test")
            .values(address=old)))
        self.assertEqual(mailbox_key(old), old)
        found = await service.find(old)
        assert found is not None
        self.assertEqual((await service.access(bob.id, old)).mailbox.id, found.id)
        await service.set_quota(old, 10)
        self.assertEqual(await service.remove(old), 0)

    async def test_a_hosted_domain_shows_as_such_in_the_protecmail_views(self) -> None:
        web = Web.build()
        bob = await web.user("bob")
        await web.core.domains.add("team.test", bob.id, "", hosted=True)
        await web.core.domains.add("relayed.test", bob.id, "mx.relayed.test")
        key = await web.credential(bob, "apikey")
        status, _, body = await web.call("GET", "/api/v1/domain/team.test",
                                         headers={"Api-Key": key})
        self.assertEqual(status, 200)
        self.assertEqual((body["data"]["redirectTo"], body["data"]["hosted"]), ("", True))
        status, _, body = await web.call("GET", "/api/v1/domain/relayed.test",
                                         headers={"Api-Key": key})
        self.assertNotIn("hosted", body["data"])



class GranteeOutboxMixin(DatabaseMixin):
    """Outbox mail a grantee put in another user's mailbox is sent on the strength of its
    allow_send and while it is enabled: it was sent whatever became of the grantee (no
    author was kept), as the mailbox's address, however long it waited."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.db = await self.open_database()
        self.bob = await add_hosted_mailbox(self.db, BOX)
        self.joe = await self.db.run("user", thd_make_user, "joe")
        self.boxes = MailboxService(self.db, Clock())
        self.mail = MailService(self.db, Clock(), "mx.test", MailFiles(Path(self.mktemp())),
                                CpuPool.for_tests())
        await self.boxes.set_grant(self.bob, BOX, "joe",
                                   {"allow_read": True, "allow_send": True})
        written = await self.mail.create(self.joe, "joe@owner.test", Edit("outbox", {
            "from": BOX, "to": "x@far.test", "body": "from joe"}))
        self.assertEqual(written.outcome, Outcome.ENQUEUED)
        # the owner's own mail, which nothing here holds back
        await self.mail.create(self.bob, BOX, Edit("outbox", {"to": "y@far.test"}))
        self.assertEqual(len(await self.db.read("outbox", thd_outbox, 10)), 2)

    async def bodies_waiting(self) -> list[str]:
        rows = await self.db.read("outbox", thd_outbox, 10)
        return [env.recipients[0].address for _, _, _, env, _, _ in rows]

    async def drafts(self) -> list[tuple[str, Any, Any]]:
        m = mailapi_mail.c
        return [tuple(r) for r in await self.db.read("drafts", lambda c: c.execute(
            select(m.body, m.raw, m.queue_id).where(m.status == "draft")).all())]

    async def used_is_the_sum(self) -> None:
        used, total = await self.db.read("used", lambda c: (
            c.execute(select(mailboxes.c.used_bytes)).scalar_one(),
            c.execute(select(func.sum(mailapi_mail.c.size))).scalar_one()))
        self.assertEqual(used, total)

    async def test_a_revoked_grantees_outbox_mail_goes_back_to_the_drafts(self) -> None:
        await self.boxes.revoke(self.bob, BOX, "joe")
        self.assertEqual(await self.bodies_waiting(), ["y@far.test"])
        self.assertEqual(await self.drafts(), [("from joe", None, None)])
        await self.used_is_the_sum()

    async def test_allow_send_taken_away_sends_it_back_to_the_drafts(self) -> None:
        await self.boxes.set_grant(self.bob, BOX, "joe", {"allow_send": False})
        self.assertEqual(await self.bodies_waiting(), ["y@far.test"])
        self.assertEqual(await self.drafts(), [("from joe", None, None)])
        await self.used_is_the_sum()

    async def test_a_deleted_grantees_outbox_mail_goes_back_to_the_drafts(self) -> None:
        await self.boxes.forget_grantee(self.joe)
        self.assertEqual(await self.bodies_waiting(), ["y@far.test"])
        self.assertEqual(await self.drafts(), [("from joe", None, None)])

    async def test_a_disabled_grantees_outbox_mail_waits(self) -> None:
        [(joe_row, _, joe_qid, *_), _] = await self.db.read("outbox", thd_outbox, 10)
        await self.db.run("disable", lambda c: c.execute(
            update(users).where(users.c.id == self.joe).values(is_active=False)))
        self.assertEqual(await self.bodies_waiting(), ["y@far.test"])
        # read before the user was disabled: the take refuses it all the same
        self.assertFalse(await self.db.run("take", thd_take, joe_row, joe_qid, 1.0))
        await self.db.run("enable", lambda c: c.execute(
            update(users).where(users.c.id == self.joe).values(is_active=True)))
        self.assertEqual(await self.bodies_waiting(), ["x@far.test", "y@far.test"])
        self.assertTrue(await self.db.run("take", thd_take, joe_row, joe_qid, 1.0))


class ReplyToRevokedMixin(DatabaseMixin):
    """Outbox mail a grantee sent from its own mailbox with another user's mailbox as
    reply-to (its allow_reply_to there) is sent only while it holds that right: a revoke
    left it queued, and it went out with the reply-to it may no longer use."""

    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        self.db = await self.open_database()
        self.bob = await add_hosted_mailbox(self.db, BOX)
        self.joe = await self.db.run("user", thd_make_user, "joe")
        await self.db.run("box", lambda c: c.execute(insert(mailboxes).values(
            address="joe@hosted.test", owner_id=self.joe, created_at=1.0,
            domain_id=c.execute(select(mailboxes.c.domain_id)).scalar_one())))
        self.boxes = MailboxService(self.db, Clock())
        self.mail = MailService(self.db, Clock(), "mx.test", MailFiles(Path(self.mktemp())),
                                CpuPool.for_tests())
        await self.boxes.set_grant(self.bob, BOX, "joe", {"allow_reply_to": True})
        for to, reply_to in (("x@far.test", f"Bob <{BOX.upper()}>"), ("y@far.test", ""),
                             ("z@far.test", f"joe@hosted.test, {BOX}")):
            written = await self.mail.create(self.joe, "joe@hosted.test", Edit("outbox", {
                "from": "joe@hosted.test", "to": to, "reply-to": reply_to}))
            self.assertEqual(written.outcome, Outcome.ENQUEUED)
        self.assertEqual(len(await self.waiting()), 3)

    async def waiting(self) -> list[str]:
        rows = await self.db.read("outbox", thd_outbox, 10)
        return [env.recipients[0].address for _, _, _, env, _, _ in rows]

    async def unsent(self) -> list[str]:
        m = mailapi_mail.c
        drafts = await self.db.read("drafts", lambda c: c.execute(
            select(m.to_addrs, m.raw, m.queue_id).where(m.status == "draft")
            .order_by(m.to_addrs)).all())
        self.assertEqual([(raw, qid) for _, raw, qid in drafts], [(None, None)] * len(drafts))
        used, total = await self.db.read("used", lambda c: (
            c.execute(select(func.sum(mailboxes.c.used_bytes))).scalar_one(),
            c.execute(select(func.sum(mailapi_mail.c.size))).scalar_one()))
        self.assertEqual(used, total)
        return [to for to, _, _ in drafts]

    async def test_allow_reply_to_taken_away_sends_that_mail_back_to_the_drafts(self) -> None:
        await self.boxes.set_grant(self.bob, BOX, "joe", {"allow_read": True})
        self.assertEqual(len(await self.waiting()), 3)  # (another right changed)
        await self.boxes.set_grant(self.bob, BOX, "joe", {"allow_reply_to": False})
        self.assertEqual(await self.waiting(), ["y@far.test"])
        self.assertEqual(await self.unsent(), ["x@far.test", "z@far.test"])

    async def test_a_revoke_sends_that_mail_back_to_the_drafts(self) -> None:
        await self.boxes.revoke(self.bob, BOX, "joe")
        self.assertEqual(await self.waiting(), ["y@far.test"])
        self.assertEqual(await self.unsent(), ["x@far.test", "z@far.test"])

    async def test_a_deleted_grantees_mail_with_that_reply_to_goes_back(self) -> None:
        await self.boxes.forget_grantee(self.joe)
        self.assertEqual(await self.waiting(), ["y@far.test"])
        self.assertEqual(await self.unsent(), ["x@far.test", "z@far.test"])


class SQLiteReplyToRevokedTests(ReplyToRevokedMixin, TestCase):
    backend = "sqlite"


class PostgreSQLReplyToRevokedTests(ReplyToRevokedMixin, TestCase):
    backend = "postgresql"


class SQLiteGranteeOutboxTests(GranteeOutboxMixin, TestCase):
    backend = "sqlite"


class PostgreSQLGranteeOutboxTests(GranteeOutboxMixin, TestCase):
    backend = "postgresql"


class PostgreSQLMailboxDeleteTests(DatabaseMixin, TestCase):
    backend = "postgresql"

    async def test_a_mailbox_with_outbox_mail_is_kept_and_deleted_once_sent(self) -> None:
        # The lock the delete takes, and the one mail put in the outbox holds, on the real
        # server (SQLite ignores both: its writers take turns).
        db = await self.open_database()
        clock = Clock()
        owner = await add_hosted_mailbox(db, BOX)
        boxes = MailboxService(db, clock)
        mail = MailService(db, clock, "mx.test", MailFiles(Path(self.mktemp())),
                           CpuPool.for_tests())
        written = await mail.create(owner, BOX, Edit("outbox", {"to": "x@customer.test"}))
        self.assertEqual(written.outcome, Outcome.ENQUEUED)
        with self.assertRaises(MailApiError) as refused:
            await boxes.delete(owner, BOX)
        self.assertEqual(refused.exception.kind, CONFLICT)
        [(row_id, *_)] = await db.read("outbox", thd_outbox, 10)
        await db.run("sent", thd_mark_sent, [row_id], clock.seconds())
        await boxes.delete(owner, BOX)
        self.assertIsNone(await boxes.find(BOX))


class PostgreSQLGrantRaceTests(DatabaseMixin, TestCase):
    """Another request changes the same grant between a grant change's read of it and its
    write (PostgreSQL; SQLite's writers take turns)."""

    backend = "postgresql"

    async def race(self, existing: bool) -> tuple[Any, Any]:
        db = await self.open_database()
        owner = await db.run("user", thd_make_user, "bob")
        joe = await db.run("user", thd_make_user, "joe")
        await db.run("box", lambda c: c.execute(insert(mailboxes).values(
            address=BOX, owner_id=owner, created_at=1.0)))
        boxes = MailboxService(db, Clock())
        if existing:
            await boxes.set_grant(owner, BOX, "joe", {"allow_delete": True})
        fired = False

        def other_request(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            # Just before this change writes the grant, another request's grant of
            # allow_send commits (on its own connection).
            nonlocal fired
            if fired or not statement.lstrip().startswith(("INSERT INTO mailbox_grants",
                                                            "UPDATE mailbox_grants")):
                return
            fired = True
            with db.engine.begin() as other:
                if existing:
                    other.execute(update(mailbox_grants).where(
                        mailbox_grants.c.user_id == joe).values(allow_send=True))
                else:
                    other.execute(insert(mailbox_grants).values(
                        mailbox_id=1, user_id=joe, allow_send=True))

        event.listen(db.engine, "before_cursor_execute", other_request)
        try:
            grant: Any = await boxes.set_grant(owner, BOX, "joe", {"allow_read": True})
        except Exception as e:
            grant = e
        finally:
            event.remove(db.engine, "before_cursor_execute", other_request)
        self.assertTrue(fired)
        [row] = await db.read("grant", lambda c: c.execute(select(mailbox_grants)).all())
        return grant, row

    async def test_a_grant_changed_as_it_is_revoked_is_made_again(self) -> None:
        # Another request removed joe from the access list just before this change wrote
        # his grant: the update found no row, and so did the read of the grant after it
        # (NoResultFound, a 500). The change, the later of the two, makes the grant again.
        db = await self.open_database()
        owner = await db.run("user", thd_make_user, "bob")
        joe = await db.run("user", thd_make_user, "joe")
        await db.run("box", lambda c: c.execute(insert(mailboxes).values(
            address=BOX, owner_id=owner, created_at=1.0)))
        boxes = MailboxService(db, Clock())
        await boxes.set_grant(owner, BOX, "joe", {"allow_send": True})
        fired = False

        def revoke(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            nonlocal fired
            if fired or not statement.lstrip().startswith("UPDATE mailbox_grants"):
                return
            fired = True
            with db.engine.begin() as other:
                other.execute(delete(mailbox_grants).where(mailbox_grants.c.user_id == joe))

        event.listen(db.engine, "before_cursor_execute", revoke)
        try:
            grant = await boxes.set_grant(owner, BOX, "joe", {"allow_read": True})
        finally:
            event.remove(db.engine, "before_cursor_execute", revoke)
        self.assertTrue(fired)
        expected = {**NONE, "allow_read": True}
        self.assertEqual(grant.rights.as_dict(), expected)
        [row] = await db.read("grant", lambda c: c.execute(select(mailbox_grants)).all())
        self.assertEqual({r: getattr(row, r) for r in RIGHTS}, expected)

    async def test_a_first_grant_made_twice_at_once_is_no_failure(self) -> None:
        # The second insert of the grant failed (IntegrityError: a 500 to the client).
        grant, row = await self.race(existing=False)
        self.assertIsInstance(grant, Grant)
        expected = {**NONE, "allow_read": True, "allow_send": True}
        self.assertEqual(grant.rights.as_dict(), expected)
        self.assertEqual({r: getattr(row, r) for r in RIGHTS}, expected)

    async def test_two_changes_of_one_grant_at_once_both_hold(self) -> None:
        # The change wrote every right as it had read them: allow_send, granted by the
        # other request meanwhile, was taken away again.
        grant, row = await self.race(existing=True)
        expected = {**NONE, "allow_read": True, "allow_send": True, "allow_delete": True}
        self.assertEqual(grant.rights.as_dict(), expected)
        self.assertEqual({r: getattr(row, r) for r in RIGHTS}, expected)

    async def test_a_right_granted_as_a_grant_of_none_is_removed_stays(self) -> None:
        # A change that leaves joe no right removes his grant's row; a right another
        # request granted meanwhile (committed just before the removal; this change, naming
        # no right, took no lock on the row) is kept, that change being the later.
        db = await self.open_database()
        owner = await db.run("user", thd_make_user, "bob")
        joe = await db.run("user", thd_make_user, "joe")
        await db.run("box", lambda c: c.execute(insert(mailboxes).values(
            address=BOX, owner_id=owner, created_at=1.0)))
        # A row of no rights, as a grant of none left before.
        await db.run("row", lambda c: c.execute(insert(mailbox_grants).values(
            mailbox_id=1, user_id=joe, **NONE)))
        boxes = MailboxService(db, Clock())
        fired = False

        def other_request(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            nonlocal fired
            if fired or not statement.lstrip().startswith("DELETE FROM mailbox_grants"):
                return
            fired = True
            with db.engine.begin() as other:
                other.execute(update(mailbox_grants).where(
                    mailbox_grants.c.user_id == joe).values(allow_send=True))

        event.listen(db.engine, "before_cursor_execute", other_request)
        try:
            grant = await boxes.set_grant(owner, BOX, "joe", {})
        finally:
            event.remove(db.engine, "before_cursor_execute", other_request)
        self.assertTrue(fired)
        self.assertEqual(grant.rights.as_dict(), NONE)  # as this change found it
        [row] = await db.read("grant", lambda c: c.execute(select(mailbox_grants)).all())
        self.assertEqual({r: getattr(row, r) for r in RIGHTS}, {**NONE, "allow_send": True})


class PostgreSQLWritesRacingAMailboxDeleteTests(DatabaseMixin, TestCase):
    """A mailbox deleted (committed on another connection) while a write that read it is
    under way: the write answers as if it had come a moment later, never with the store's
    foreign-key failure (a 500), and stores what it can (PostgreSQL; SQLite's writers take
    turns)."""

    backend = "postgresql"
    ZED = "zed@hosted.test"

    async def setUp(self) -> None:  # type: ignore[override]
        self.db = await self.open_database()
        self.bob = await add_hosted_mailbox(self.db, BOX)
        self.joe = await self.db.run("user", thd_make_user, "joe")
        await self.db.run("box", lambda c: c.execute(insert(mailboxes).values(
            address=self.ZED, owner_id=self.bob, created_at=1.0,
            domain_id=select(mailboxes.c.domain_id).scalar_subquery())))
        self.boxes = MailboxService(self.db, Clock())
        self.mail = MailService(self.db, Clock(), "mx.test", MailFiles(Path(self.mktemp())),
                                CpuPool.for_tests())

    async def deleting(self, address: str, after: str, work: Any) -> Any:
        """Run `work()`; once it has run a statement containing `after`, the mailbox at
        `address` is deleted on another connection (given two seconds to commit: a write
        holding the mailbox makes it wait). `work`'s result, or what it raised."""
        done = threading.Event()
        started: list[threading.Thread] = []

        def remove() -> None:
            try:
                with self.db.engine.begin() as other:
                    other.execute(delete(mailboxes).where(mailboxes.c.address == address))
            finally:
                done.set()

        def meanwhile(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if started or after not in statement:
                return
            started.append(threading.Thread(target=remove))
            started[0].start()
            done.wait(2.0)

        event.listen(self.db.engine, "after_cursor_execute", meanwhile)
        try:
            result = await work()
        except Exception as e:
            result = e
        finally:
            event.remove(self.db.engine, "after_cursor_execute", meanwhile)
        self.assertTrue(started)
        await threads.deferToThread(started[0].join, 30.0)
        self.assertTrue(done.is_set())
        return result

    async def mail_rows(self) -> list[tuple[str, str, int]]:
        return [tuple(r) for r in await self.db.read("rows", lambda c: c.execute(
            select(mailapi_mail.c.status, mailboxes.c.address, mailboxes.c.mail_count)
            .join(mailboxes, mailboxes.c.id == mailapi_mail.c.mailbox_id)).all())]

    async def written_as_its_mailbox_goes(self, status: str) -> Any:
        """bob writes a mail from BOX, deleted once the write has read bob's rights."""
        written = await self.deleting(BOX, "mailbox_grants.user_id", lambda: self.mail.create(
            self.bob, BOX, Edit(status, {"from": BOX, "to": "x@far.test"})))
        self.assertNotIsInstance(written, Exception)
        return written

    async def test_a_draft_written_as_its_mailbox_goes_is_kept_in_another(self) -> None:
        # The mail's row was inserted into the mailbox it had read: IntegrityError, 500
        # "mail not sent / draft not saved". Now the mailbox is held from then on, or the
        # rights read again when it went: the draft is kept in bob's other mailbox.
        written = await self.written_as_its_mailbox_goes("draft")
        self.assertEqual(written.outcome, Outcome.SAVED)
        self.assertEqual(await self.mail_rows(), [("draft", self.ZED, 1)])

    async def test_a_mail_sent_as_its_mailbox_goes_stays_a_draft_in_another(self) -> None:
        # Its `from` gone, the mail is kept as a draft, 401 "unauthorized from".
        written = await self.written_as_its_mailbox_goes("outbox")
        self.assertEqual(written.outcome, Outcome.UNAUTHORIZED)
        self.assertEqual(await self.mail_rows(), [("draft", self.ZED, 1)])

    async def test_a_grant_made_as_its_mailbox_goes_is_no_failure(self) -> None:
        # The grant's row was inserted for the mailbox read: IntegrityError, a 500.
        grant = await self.deleting(BOX, "mailboxes.address", lambda: self.boxes.set_grant(
            self.bob, BOX, "joe", {"allow_read": True}))
        if isinstance(grant, MailApiError):
            self.assertEqual(grant.kind, "not_found")
        else:
            self.assertIsInstance(grant, Grant)
        self.assertIsNone(await self.boxes.find(BOX))
        self.assertEqual(await self.db.read("grants", lambda c: c.execute(
            select(mailbox_grants)).all()), [])

    async def test_a_draft_sent_from_a_mailbox_that_goes_stays_a_draft(self) -> None:
        # A draft of zed's put in the outbox from bob@: the from mailbox went between the
        # check that it is served and its hold, and the edit answered 404 "email not found"
        # with the draft as it was. It is the draft, edited, and 401.
        draft = await self.mail.create(self.bob, self.ZED, Edit("draft", {
            "from": self.ZED, "to": "x@far.test"}))
        written = await self.deleting(BOX, "domains.verify_token", lambda: self.mail.update(
            self.bob, draft.public_id, Edit("outbox", {"from": BOX, "subject": "s"}), None))
        self.assertNotIsInstance(written, Exception)
        self.assertEqual(written.outcome, Outcome.UNAUTHORIZED)
        mail = await self.mail.get(self.bob, draft.public_id)
        self.assertEqual((mail.status, mail.fields["from"], mail.fields["subject"]),
                         ("draft", BOX, "s"))

    async def test_a_delivery_to_a_mailbox_that_goes_stores_its_other_recipients(
            self) -> None:
        # The delivery read BOX as hosted, the delete committed, and the insert of its mail
        # failed on the foreign key: the whole delivery (ZED's copy too) was deferred, 4.3.0
        # "mailbox store unavailable", to be tried again later. The mailbox is now held
        # from its read: the delete waits, then takes BOX's copy along.
        files = MailFiles(Path(self.mktemp()))
        files.prepare()
        local = LocalMailboxes(files, CpuPool.for_tests())
        prepared = await local.prepare("Q1", b"From: s@far.test\r\nSubject: hi\r\n\r\nhi\r\n")
        stored, _full, _waiting = await self.deleting(BOX, "mailboxes.address", lambda: self.db.run(
            "deliver", local.thd_store, [(1, BOX), (2, self.ZED)], "Q1", prepared, 1.0))
        self.assertEqual(stored, {1, 2})
        self.assertIsNone(await self.boxes.find(BOX))
        self.assertEqual(await self.mail_rows(), [("inbox", self.ZED, 1)])


    async def test_reading_a_mail_as_its_mailbox_goes_is_404(self) -> None:
        # Reading unread inbox mail marks it read and reads it again: deleted (with its
        # mailbox) in between, the second read found no row (NoResultFound, a 500).
        files = MailFiles(Path(self.mktemp()))
        files.prepare()
        local = LocalMailboxes(files, CpuPool.for_tests())
        prepared = await local.prepare("Q1", b"From: s@far.test\r\nSubject: hi\r\n\r\nhi\r\n")
        await self.db.run("deliver", local.thd_store, [(1, BOX)], "Q1", prepared, 1.0)
        [public_id] = await self.db.read("id", lambda c: c.execute(
            select(mailapi_mail.c.public_id)).scalars().all())
        read = await self.deleting(BOX, "mailapi_mail.public_id =", lambda: self.mail.get(
            self.bob, public_id))
        self.assertIsInstance(read, MailApiError)
        self.assertEqual((read.kind, read.message), ("not_found", "email not found"))
