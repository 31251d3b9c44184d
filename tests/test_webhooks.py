"""Webhooks: settings, the address policy, signatures, the events a sync queues, and the
background sender (signing, retries with backoff on a Clock, timeouts, 410, the delivery log),
with receivers behind StubTreq."""

from __future__ import annotations

import datetime
import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.exc import OperationalError
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailcore.config import ConfigError
from mailcore.fetch.accounts import INTERRUPTED
from mailcore.fetch.engine import SyncResult
from mailcore.fetch.scheduler import FetchScheduler
from mailcore.messages import store as message_store
from mailcore.messages.models import FetchedMessage, Location
from mailcore.store.prepared import Prepared
from mailcore.store.schema import webhook_deliveries, webhook_events
from mailcore.webhooks import (
    AddressPolicy,
    WebhookError,
    WebhookPruner,
    WebhookSender,
    WebhookSettings,
    build_webhooks,
    iso,
    sign,
    verify_signature,
)
from mailcore.webhooks import store as delivery_store
from mailcore.webhooks.events import SWEEP_INTERVAL
from tests.support.db import engine_query_plans, transaction_answers
from tests.support.imap2api import Client, Receiver, client, config, mail, store
from tests.support.web import Web
from tests.support.webhooks import sync_ended

HOOK = "https://hooks.example.com/in"


class SettingsTests(TestCase):
    def test_defaults_and_parsing(self) -> None:
        s = WebhookSettings.from_section({})
        self.assertEqual((s.allow_loopback, s.allow_private, s.max_attempts), (False, False, 8))
        s = WebhookSettings.from_section({
            "allow_loopback": True, "allow_networks": ["10.1.0.0/16"], "timeout": 3,
            "backoff_base": 1.5, "max_attempts": 2,
        })
        self.assertTrue(s.allow_loopback)
        self.assertEqual(str(s.allow_networks[0]), "10.1.0.0/16")
        self.assertEqual((s.timeout, s.backoff_base, s.max_attempts), (3.0, 1.5, 2))

    def test_backoff_doubles_up_to_the_maximum(self) -> None:
        s = WebhookSettings(backoff_base=30, backoff_max=200)
        self.assertEqual([s.backoff(n) for n in (1, 2, 3, 4, 5)], [30, 60, 120, 200, 200])

    def test_bad_values_are_config_errors(self) -> None:
        for section in ({"allow_private": "yes"}, {"timeout": 0}, {"max_attempts": 1.5},
                        {"deny_networks": ["not a net"]}, {"colour": "blue"},
                        {"concurrency": True}):
            self.assertRaises(ConfigError, WebhookSettings.from_section, section)


class AddressPolicyTests(TestCase):
    def policy(self, **kw: Any) -> AddressPolicy:
        return AddressPolicy(WebhookSettings.from_section(kw))

    def test_only_global_addresses_by_default(self) -> None:
        p = self.policy()
        for allowed in ("93.184.216.34", "2606:4700::1111"):
            self.assertTrue(p.allows(allowed), allowed)
        for refused in ("127.0.0.1", "::1", "10.0.0.5", "192.168.1.1", "172.16.0.1",
                        "169.254.169.254", "100.64.0.1", "fd00::1", "fe80::1", "0.0.0.0",  # noqa: S104
                        "224.0.0.1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "not an ip"):
            self.assertFalse(p.allows(refused), refused)

    def test_the_operator_opens_and_closes_ranges(self) -> None:
        loopback = self.policy(allow_loopback=True)
        self.assertTrue(loopback.allows("127.0.0.1"))
        self.assertTrue(loopback.allows("::ffff:127.0.0.1"))
        self.assertFalse(loopback.allows("10.0.0.1"))
        private = self.policy(allow_private=True)
        self.assertTrue(private.allows("10.0.0.1"))
        self.assertFalse(private.allows("127.0.0.1"))
        self.assertFalse(private.allows("0.0.0.0"))  # noqa: S104 (never allowed)
        some = self.policy(allow_networks=["10.1.2.0/24"], deny_networks=["93.184.0.0/16"])
        self.assertTrue(some.allows("10.1.2.3"))
        self.assertFalse(some.allows("10.1.3.3"))
        self.assertFalse(some.allows("93.184.216.34"))
        deny_wins = self.policy(allow_loopback=True, deny_networks=["127.0.0.0/8"])
        self.assertFalse(deny_wins.allows("127.0.0.1"))

    def test_urls(self) -> None:
        p = self.policy()
        self.assertEqual(p.check_url(" HTTPS://Hooks.Example.COM:8443/in?x=1#frag "),
                         "https://hooks.example.com:8443/in?x=1")
        self.assertEqual(p.check_url("http://bücher.example"), "http://xn--bcher-kva.example/")
        self.assertEqual(p.check_url("http://[2606:4700::1111]/h"), "http://[2606:4700::1111]/h")
        for bad in ("ftp://hooks.example.com/", "https://user:pw@hooks.example.com/",
                    "http:///nohost", "https://hooks.example.com:0/", "javascript:alert(1)",
                    "http://127.0.0.1/", "http://[::1]:8080/", "http://localhost/",
                    "http://api.localhost/", "http://2130706433/", "http://0x7f.1/",
                    "http://10.0.0.1/", "http://hooks .example.com/", "", None, 42,
                    "https://" + "a" * 2100 + ".com/"):
            with self.assertRaises(WebhookError, msg=repr(bad)) as caught:
                p.check_url(bad)
            self.assertEqual(caught.exception.field, "url")
        loopback = self.policy(allow_loopback=True)
        self.assertEqual(loopback.check_url("http://localhost:8080/x"),
                         "http://localhost:8080/x")
        self.assertEqual(loopback.check_url("http://127.0.0.1:9/"), "http://127.0.0.1:9/")


class SignatureTests(TestCase):
    def test_a_receiver_verifies_what_we_sign(self) -> None:
        body = b'{"event":"email.new"}'
        signature = sign("s3cret-s3cret-s3cret", 1_700_000_000, body)
        self.assertRegex(signature, r"^sha256=[0-9a-f]{64}$")
        ok = verify_signature("s3cret-s3cret-s3cret", "1700000000", body, signature,
                              now=1_700_000_060)
        self.assertTrue(ok)

    def test_tampering_a_wrong_secret_or_an_old_timestamp_fail(self) -> None:
        body = b'{"event":"email.new"}'
        secret = "s3cret-s3cret-s3cret"
        good = sign(secret, 1_700_000_000, body)
        now = 1_700_000_010
        self.assertFalse(verify_signature(secret, "1700000000", body + b" ", good, now=now))
        self.assertFalse(verify_signature("another-secret-xxxx", "1700000000", body, good,
                                          now=now))
        # The timestamp is signed: a replay with a fresh timestamp does not verify ...
        self.assertFalse(verify_signature(secret, "1700000005", body, good, now=now))
        # ... and the original is refused once it is old.
        self.assertFalse(verify_signature(secret, "1700000000", body, good,
                                          now=1_700_000_000 + 301))
        self.assertFalse(verify_signature(secret, None, body, good, now=now))
        self.assertFalse(verify_signature(secret, "1700000000", body, None, now=now))


    def test_the_delivery_and_event_headers_must_be_the_bodys(self) -> None:
        """The headers are copies of the signed body's id and event: a replay within the
        tolerance under another X-Mailcore-Delivery (to pass a receiver's duplicate
        check) verifies only when the receiver does not ask for them to be checked."""
        body = b'{"id":"0b7f3c1e","event":"email.new","created_at":null,"data":{}}'
        secret = "s3cret-s3cret-s3cret"
        good = sign(secret, 1_700_000_000, body)
        now = 1_700_000_010

        def check(delivery: str | bytes | None, event: str | bytes | None = None) -> bool:
            return verify_signature(secret, "1700000000", body, good, now=now,
                                    delivery=delivery, event=event)

        self.assertTrue(check("0b7f3c1e", "email.new"))
        self.assertTrue(check(b"0b7f3c1e", b"email.new"))
        self.assertFalse(check("another-delivery-id"))
        self.assertFalse(check("0b7f3c1e", "sync.completed"))
        not_json = b"not json"
        self.assertFalse(verify_signature(secret, "1700000000", not_json,
                                          sign(secret, 1_700_000_000, not_json), now=now,
                                          delivery="x"))

class Setup:
    """A Web whose webhook sender posts to a StubTreq receiver, on the Web's Clock."""

    def __init__(self, web: Web, alice: Client, receiver: Receiver, sender: WebhookSender):
        self.web = web
        self.alice = alice
        self.receiver = receiver
        self.sender = sender

    @classmethod
    async def build(cls, **settings: Any) -> Setup:
        web = Web.build(config(webhooks={"poll_interval": 1, **settings}))
        alice = await client(web)
        receiver = Receiver()
        sender = WebhookSender(web.core.webhooks, web.clock, StubTreq(receiver))
        sender.startService()
        return cls(web, alice, receiver, sender)

    @property
    def webhooks(self) -> Any:
        return self.web.core.webhooks

    def result(self, account_id: int | None, **kw: Any) -> SyncResult:
        now = datetime.datetime.fromtimestamp(self.web.clock.seconds(), datetime.UTC)
        return SyncResult(account_id=account_id or 0, user_id=self.alice.user.id,
                          started_at=now - datetime.timedelta(seconds=3), finished_at=now,
                          status="success", **kw)

    async def log(self, webhook_id: int) -> list[Any]:
        return list((await self.webhooks.deliveries(self.alice.user.id, webhook_id)).items)

    async def synced(self, batches: list[list[bytes]], protocol: str = "imap") -> SyncResult:
        """What a sync of a new account of alice's commits: each batch stored in a
        transaction that also runs the engine's recorders, then its outcome recorded with
        them. Its listeners are not called: the test does (or, for a crash, does not)."""
        core = self.web.core
        engine = core.fetch.engine
        account = await core.fetch.accounts.create(
            self.alice.user.id, protocol=protocol, host="127.0.0.1", port=143, username="u",
            password="pw", allow_cleartext=True)
        where = Location(user_id=self.alice.user.id, account_id=account.id, folder_id=None,
                         folder="INBOX")
        result = self.result(account.id)
        for raws in batches:
            stored = await core.messages.store_batch(
                where, [FetchedMessage(raw=r) for r in raws], also=engine._record(where))
            result.new_messages += len(stored.created)
            result.new_message_ids.extend(stored.created)
            result.thread_ids.update(stored.thread_ids)
        assert await core.fetch.accounts.set_status(
            account.id, also=engine._record_outcome(result), sync_status="success")
        return result

    async def told(self) -> list[tuple[str, Any]]:
        """(event, data) of every delivery row, oldest first."""

        def txn(conn: Connection) -> list[tuple[str, Any]]:
            return [(r.event, json.loads(r.payload)["data"]) for r in conn.execute(
                select(webhook_deliveries).order_by(webhook_deliveries.c.id))]

        return await self.web.core.db.read("told", txn)


class SenderTestCase(TestCase):
    async def setup(self, **settings: Any) -> Setup:
        s = await Setup.build(**settings)
        self.addCleanup(self.stop, s)
        return s

    async def stop(self, s: Setup) -> None:
        await s.sender.stopService()
        self.assertEqual(s.web.clock.getDelayedCalls(), [])

    async def tell(self, s: Setup, *results: SyncResult) -> None:
        """Call the engine's listeners with each sync's outcome, as the engine does (each
        returns at once, nothing to wait for), then let the events settle."""
        for result in results:
            for listener in s.web.core.fetch.engine.listeners:
                self.assertIsNone(listener(result))
        await s.webhooks.settle()


class EnqueueTests(SenderTestCase):
    async def test_a_sync_queues_each_subscribed_event_in_batches_of_100(self) -> None:
        s = await self.setup()
        s.sender.stopService()  # nothing is sent: this test reads what was queued
        uid = s.alice.user.id
        everything, _ = await s.webhooks.create(uid, url=HOOK)
        emails_only, _ = await s.webhooks.create(uid, url=HOOK, events=["email.new"])
        off, _ = await s.webhooks.create(uid, url=HOOK, active=False)
        bob = await client(s.web, "bob")
        bobs, _ = await s.webhooks.create(bob.user.id, url=HOOK)
        raws = [mail(i, reply_to=i - 1 if i % 3 else None) for i in range(150)]
        # Three batches: a thread (48, 49, 50) spans two of them and is told once.
        result = await s.synced([raws[:50], raws[50:100], raws[100:]])
        ids = result.new_message_ids
        details = [await s.web.core.messages.get_message(uid, i) for i in ids]
        threads = {d.summary.thread_id for d in details if d.summary.thread_id is not None}
        self.assertEqual(len(threads), 50)
        self.assertEqual(result.thread_ids, threads)

        await self.tell(s, result)

        log = await s.log(everything.id)
        self.assertEqual(sorted(d.event for d in log),
                         ["email.new", "email.new", "sync.completed", "thread.updated"])
        self.assertEqual([d.event for d in await s.log(emails_only.id)],
                         ["email.new", "email.new"])
        self.assertEqual(await s.log(off.id), [])
        self.assertEqual(list((await s.webhooks.deliveries(bob.user.id, bobs.id)).items), [])

        emails = [json.loads(d.payload) for d in log if d.event == "email.new"]
        self.assertEqual(sorted(len(p["data"]["emails"]) for p in emails), [50, 100])
        shown = {e["id"]: e for p in emails for e in p["data"]["emails"]}
        self.assertEqual(set(shown), set(ids))
        listed = await s.alice.ok("GET", f"/api/emails/{ids[4]}/")
        self.assertEqual(shown[ids[4]], {k: listed[k] for k in shown[ids[4]]})

        [completed] = [json.loads(d.payload) for d in log if d.event == "sync.completed"]
        self.assertEqual(completed["event"], "sync.completed")
        self.assertEqual(completed["data"]["status"], "success")
        self.assertEqual(completed["data"]["new_messages"], 150)
        [threaded] = [json.loads(d.payload) for d in log if d.event == "thread.updated"]
        entries = threaded["data"]["threads"]
        self.assertEqual(len(entries), 50)
        self.assertEqual({e["thread_count"] for e in entries}, {3})
        self.assertTrue(all(e["thread_id"] == e["latest_email"]["thread_id"] for e in entries))
        self.assertEqual({d.status for d in log}, {"pending"})
        self.assertEqual(len({d.delivery_id for d in log}), 4)

    async def test_a_webhook_deleted_while_a_sync_is_queued_costs_no_other_its_events(
            self) -> None:
        # Each delivery's events are told in a transaction of their own: a webhook deleted
        # in between (once made the next insert fail on its foreign key, and the user's
        # other webhooks lost that batch and every one after it) gets no more rows.
        s = await self.setup()
        s.sender.stopService()
        uid = s.alice.user.id
        gone, _ = await s.webhooks.create(uid, url=HOOK, events=["email.new"])
        kept, _ = await s.webhooks.create(uid, url=HOOK, events=["email.new"])
        ids = await store(s.web, uid, [mail(i) for i in range(150)])
        db = s.web.core.db
        write = db.run
        deleted: list[int] = []

        def run(name: str, *args: Any, **kwargs: Any) -> Any:
            if name == "tell_webhook_events" and not deleted:
                deleted.append(gone.id)
                self.successResultOf(Deferred.fromCoroutine(s.webhooks.delete(uid, gone.id)))
            return write(name, *args, **kwargs)

        self.patch(db, "run", run)
        queued = await sync_ended(s.webhooks, s.result(None, new_messages=150,
                                                        new_message_ids=ids))
        self.assertEqual((deleted, queued), ([gone.id], 2))
        self.assertEqual([d.event for d in await s.log(kept.id)], ["email.new", "email.new"])

    async def test_a_pop3_accounts_sync_tells_nothing(self) -> None:
        # The webhooks are the IMAP2API's, which lists the IMAP accounts only: a POP3
        # account's (a Dropmyemail one's) events named in `imap_server` an id that API
        # answers 404 for, and its e-mails, which its lists leave out.
        s = await self.setup()
        s.sender.stopService()
        uid = s.alice.user.id
        await s.webhooks.create(uid, url=HOOK)
        imap = await s.synced([[mail(1)]])
        popped = await s.synced([[mail(2, reply_to=1), mail(3)]], protocol="pop")
        self.assertEqual(len(popped.new_message_ids), 2)
        await self.tell(s, imap, popped)
        told = await s.told()
        self.assertEqual(sorted(event for event, _ in told),
                         ["email.new", "sync.completed", "thread.updated"])
        self.assertEqual({data["imap_server"] for _, data in told}, {imap.account_id})
        [entry] = next(data["threads"] for event, data in told if event == "thread.updated")
        # The thread holds the POP3 reply too: its size and newest e-mail are the IMAP's.
        self.assertEqual((entry["thread_count"], entry["latest_email"]["id"]),
                         (1, imap.new_message_ids[0]))

    async def test_telling_an_imap_sync_looks_up_no_pop3_accounts_apart(self) -> None:
        # Its e-mails are told without those of the user's POP3 accounts: the statement
        # that reads them asks whether one holds mail, so a user with none (nearly all)
        # has them not looked up apart (a statement more each time told, on PostgreSQL a
        # round trip).
        s = await self.setup()
        s.sender.stopService()
        await s.webhooks.create(s.alice.user.id, url=HOOK)
        looked_up: list[Any] = []
        real = Prepared.rows

        def rows(prepared: Prepared, conn: Connection, values: Any) -> list[Any]:
            if prepared is message_store._POP_ACCOUNTS_WITH_MAIL:
                looked_up.append(values)
            return real(prepared, conn, values)

        self.patch(Prepared, "rows", rows)
        result = await s.synced([[mail(1), mail(2, reply_to=1)]])
        await self.tell(s, result)
        told = await s.told()
        self.assertEqual(sorted(event for event, _ in told),
                         ["email.new", "sync.completed", "thread.updated"])
        [entry] = next(data["threads"] for event, data in told if event == "thread.updated")
        self.assertEqual(entry["thread_count"], 2)
        self.assertEqual(looked_up, [])

    async def test_events_of_an_account_turned_to_pop3_before_they_are_told_are_dropped(
            self) -> None:
        s = await self.setup()
        s.sender.stopService()
        uid = s.alice.user.id
        await s.webhooks.create(uid, url=HOOK)
        result = await s.synced([[mail(1)]])
        await s.web.core.fetch.accounts.update(uid, result.account_id, protocol="pop",
                                               host="pop.example.test", password="p")
        await self.tell(s, result)
        self.assertEqual(await s.told(), [])

    async def test_no_webhook_means_no_rows_and_a_failed_sync_is_reported(self) -> None:
        s = await self.setup()
        self.assertEqual(await sync_ended(s.webhooks, s.result(None)), 0)
        await s.webhooks.create(s.alice.user.id, url=HOOK, events="sync.completed")
        failed = s.result(7)
        failed.status, failed.error = "error", "login refused"
        self.assertEqual(await sync_ended(s.webhooks, failed), 1)
        s.web.clock.advance(0)
        [(_, body)] = s.receiver.received
        data = json.loads(body)["data"]
        self.assertEqual((data["imap_server"], data["status"], data["error"]),
                         (7, "error", "login refused"))


class DurableEventsTests(SenderTestCase):
    """A sync's events are recorded in the transactions that commit what they describe, and
    told at least once: what a crash or a store error left after the commit is told by the
    sender's sweep, once."""

    async def test_events_a_crash_left_after_the_syncs_commit_are_told_once_at_restart(
            self) -> None:
        s = await self.setup()
        uid = s.alice.user.id
        hook, _ = await s.webhooks.create(uid, url=HOOK)
        raws = [mail(i, reply_to=i - 1 if i % 3 else None) for i in range(120)]
        result = await s.synced([raws[:60], raws[60:]])
        # The process dies here: its outcome is committed, its listeners never run (the
        # old code wrote the deliveries only there, so they were lost for good).
        await s.sender.stopService()
        self.assertEqual(await s.told(), [])
        # The restart: a new service and sender on the same store; the first sweep tells.
        again = build_webhooks({"poll_interval": 1}, s.web.core.db, s.web.clock,
                               s.web.core.fetch.secrets, http=StubTreq(s.receiver))
        assert again.sender is not None
        again.sender.startService()
        self.addCleanup(again.sender.stopService)
        s.web.clock.advance(0)
        told = await s.told()
        self.assertEqual([event for event, _ in told],
                         ["email.new", "thread.updated", "email.new", "sync.completed"])
        emails = [e["id"] for event, data in told if event == "email.new"
                  for e in data["emails"]]
        self.assertEqual(sorted(emails), sorted(result.new_message_ids))
        [threads] = [data["threads"] for event, data in told if event == "thread.updated"]
        self.assertEqual(len(threads), 40)
        [completed] = [data for event, data in told if event == "sync.completed"]
        self.assertEqual((completed["imap_server"], completed["new_messages"]),
                         (result.account_id, 120))
        self.assertEqual(len(s.receiver.received), 4)
        # Later sweeps, and the listener had it run after all, tell nothing twice.
        s.webhooks.on_sync(result)
        await s.webhooks.settle()
        for _ in range(3):
            s.web.clock.advance(SWEEP_INTERVAL)
        self.assertEqual(len(await s.told()), 4)
        self.assertEqual(len(s.receiver.received), 4)
        self.assertEqual({d.status for d in await s.log(hook.id)}, {"success"})

    async def test_a_sync_its_process_died_in_is_told_completed_as_interrupted(self) -> None:
        """A sync killed mid-way had its e-mails told (recorded with its batches), and the
        scheduler then showed it failed, interrupted; its sync.completed was never sent, so
        a client waiting for it to end waited for good (found by an audit)."""
        s = await self.setup()
        uid = s.alice.user.id
        await s.webhooks.create(uid, url=HOOK, events=["sync.completed", "email.new"])
        core = s.web.core
        engine = core.fetch.engine
        account = await core.fetch.accounts.create(
            uid, host="127.0.0.1", port=143, username="u", password="pw", allow_cleartext=True)
        started = engine.now()
        await core.fetch.accounts.set_status(account.id, sync_status="running",
                                             sync_started_at=started)
        s.web.clock.advance(3)
        where = Location(user_id=uid, account_id=account.id, folder_id=None, folder="INBOX")
        stored = await core.messages.store_batch(
            where, [FetchedMessage(raw=mail(i)) for i in range(3)], also=engine._record(where))
        # The process dies here; a scheduler (this node's next start, or another node once
        # the lease lapsed) settles the sync, and the sender's sweep tells what is pending.
        s.web.clock.advance(3)
        await FetchScheduler(engine).settle_interrupted()
        await FetchScheduler(engine).settle_interrupted()  # settled once
        s.web.clock.advance(SWEEP_INTERVAL)
        told = await s.told()
        self.assertEqual([event for event, _ in told], ["email.new", "sync.completed"])
        self.assertEqual([e["id"] for e in told[0][1]["emails"]], stored.created)
        self.assertEqual(told[1][1], {
            "imap_server": account.id, "status": "error", "error": INTERRUPTED,
            "new_messages": 3, "started_at": iso(started),
            "finished_at": iso(started + datetime.timedelta(seconds=6))})
        shown = await core.fetch.accounts.get(uid, account.id)
        self.assertEqual((shown.sync_status, shown.sync_error), ("error", INTERRUPTED))

    async def test_a_store_error_while_telling_leaves_the_events_to_the_sweep(self) -> None:
        s = await self.setup()
        await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed",
                                                                    "email.new"])
        result = await s.synced([[mail(i) for i in range(3)]])
        db = s.web.core.db
        write = db.run
        failed: list[str] = []

        def run(name: str, *args: Any, **kwargs: Any) -> Any:
            if name == "tell_webhook_events" and not failed:
                failed.append(name)
                return fail(OperationalError("INSERT", {}, Exception("disk I/O error")))
            return write(name, *args, **kwargs)

        self.patch(db, "run", run)
        for listener in s.web.core.fetch.engine.listeners:
            listener(result)
        await s.webhooks.settle()
        self.flushLoggedErrors(OperationalError)
        self.assertEqual((failed, await s.told()), (["tell_webhook_events"], []))
        s.web.clock.advance(SWEEP_INTERVAL)
        told = await s.told()
        self.assertEqual([event for event, _ in told], ["email.new", "sync.completed"])
        self.assertEqual([e["id"] for e in told[0][1]["emails"]], result.new_message_ids)
        s.web.clock.advance(SWEEP_INTERVAL)
        self.assertEqual(len(await s.told()), 2)
        self.assertEqual(len(s.receiver.received), 2)

    async def test_a_user_without_webhooks_gets_no_pending_event(self) -> None:
        s = await self.setup()
        await s.synced([[mail(i) for i in range(5)]])

        def pending(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).select_from(webhook_events)).scalar()
                       or 0)

        self.assertEqual(await s.web.core.db.read("pending", pending), 0)
        await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        await s.synced([[mail(i, tag="n") for i in range(5)]])
        self.assertEqual(await s.web.core.db.read("pending", pending), 1)


class DeliveryTests(SenderTestCase):
    async def test_a_delivery_is_signed_and_logged(self) -> None:
        s = await self.setup()
        hook, secret = await s.webhooks.create(s.alice.user.id, url=HOOK,
                                               events=["sync.completed"])
        await sync_ended(s.webhooks, s.result(3, new_messages=2))
        s.web.clock.advance(0)
        [(headers, body)] = s.receiver.received
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["x-mailcore-event"], "sync.completed")
        self.assertTrue(verify_signature(
            secret, headers["x-mailcore-timestamp"], body, headers["x-mailcore-signature"],
            now=s.web.clock.seconds(), delivery=headers["x-mailcore-delivery"],
            event=headers["x-mailcore-event"],
        ))
        payload = json.loads(body)
        self.assertEqual(payload["id"], headers["x-mailcore-delivery"])
        self.assertEqual(payload["data"]["new_messages"], 2)
        [entry] = await s.log(hook.id)
        self.assertEqual((entry.status, entry.attempts, entry.last_status_code,
                          entry.last_error), ("success", 1, 200, None))
        self.assertEqual(entry.completed_at, s.web.clock.seconds())

    async def test_a_disabled_users_deliveries_wait_until_it_is_enabled(self) -> None:
        """`mailcore user disable` must stop the user's mail from leaving by its webhooks
        (an account disabled because it was taken over)."""
        s = await self.setup()
        identity = s.web.core.identity
        await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        await identity.set_active(s.alice.user.id, False)
        await sync_ended(s.webhooks, s.result(3))
        s.web.clock.advance(5)
        self.assertEqual(s.receiver.received, [])
        await identity.set_active(s.alice.user.id, True)
        s.web.clock.advance(1)
        self.assertEqual(len(s.receiver.received), 1)

    async def test_failures_are_retried_with_exponential_backoff_then_given_up(self) -> None:
        s = await self.setup(max_attempts=4, backoff_base=10)
        s.receiver.codes = [500, 503, 502, 500]
        hook, _ = await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        await sync_ended(s.webhooks, s.result(1))
        s.web.clock.advance(0)
        start = s.web.clock.seconds()
        times = [0.0]
        for wait in (10, 20, 40):
            s.web.clock.advance(wait - 1)  # the poll runs every second: not yet
            self.assertEqual(len(s.receiver.received), len(times))
            s.web.clock.advance(1)
            self.assertEqual(len(s.receiver.received), len(times) + 1)
            times.append(s.web.clock.seconds() - start)
        self.assertEqual(times, [0, 10, 30, 70])
        [entry] = await s.log(hook.id)
        self.assertEqual((entry.status, entry.attempts, entry.last_status_code),
                         ("failed", 4, 500))
        self.assertTrue(entry.last_error.startswith("HTTP 500: boom"), entry.last_error)
        self.assertLessEqual(len(entry.last_error), 600)  # the answer is cut short
        s.web.clock.advance(1000)
        self.assertEqual(len(s.receiver.received), 4)  # given up
        ids = {h["x-mailcore-delivery"] for h, _ in s.receiver.received}
        self.assertEqual(len(ids), 1)  # every retry names the same delivery

    async def test_retries_past_the_1025th_keep_the_maximum_backoff(self) -> None:
        # 30 * 2**1024 overflowed: the attempt raised before it was recorded, so the
        # delivery was posted again after every lease (a minute) instead of every hour.
        s = await self.setup(max_attempts=5000, backoff_base=30, backoff_max=3600)
        s.receiver.codes = [500] * 10
        hook, _ = await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        await sync_ended(s.webhooks, s.result(1))
        await s.web.core.db.run("many_attempts", lambda conn: conn.execute(
            update(webhook_deliveries).values(attempts=1100)))
        s.web.clock.advance(0)
        self.assertEqual(len(s.receiver.received), 1)
        [entry] = await s.log(hook.id)
        self.assertEqual((entry.status, entry.attempts), ("pending", 1101))
        self.assertEqual(entry.next_attempt_at, s.web.clock.seconds() + 3600)
        s.web.clock.pump([60] * 59)
        self.assertEqual(len(s.receiver.received), 1)

    async def test_a_receiver_that_recovers_gets_the_delivery(self) -> None:
        s = await self.setup(backoff_base=5)
        s.receiver.codes = [500]
        hook, _ = await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        await sync_ended(s.webhooks, s.result(1))
        s.web.clock.advance(0)
        [entry] = await s.log(hook.id)
        self.assertEqual((entry.status, entry.attempts), ("pending", 1))
        self.assertEqual(entry.next_attempt_at, s.web.clock.seconds() + 5)
        s.web.clock.advance(5)
        [entry] = await s.log(hook.id)
        self.assertEqual((entry.status, entry.attempts, entry.last_status_code),
                         ("success", 2, 200))

    async def test_410_gone_stops_and_disables_the_webhook(self) -> None:
        s = await self.setup(concurrency=1)
        s.receiver.codes = [410]
        hook, _ = await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        await sync_ended(s.webhooks, s.result(1))
        await sync_ended(s.webhooks, s.result(1))
        s.web.clock.advance(0)
        entries = await s.log(hook.id)
        self.assertEqual(sorted(e.status for e in entries), ["cancelled", "failed"])
        self.assertFalse((await s.webhooks.get(s.alice.user.id, hook.id)).active)
        self.assertEqual(len(s.receiver.received), 1)

    async def test_a_receiver_that_never_answers_times_out_and_is_retried(self) -> None:
        s = await self.setup(timeout=10, backoff_base=60)
        s.receiver.hang = True
        hook, _ = await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        await sync_ended(s.webhooks, s.result(1))
        s.web.clock.advance(0)
        self.assertEqual(len(s.receiver.received), 1)
        [entry] = await s.log(hook.id)
        self.assertEqual((entry.status, entry.attempts), ("pending", 0))  # in flight
        s.web.clock.advance(10)
        [entry] = await s.log(hook.id)
        self.assertEqual((entry.status, entry.attempts, entry.last_error),
                         ("pending", 1, "no answer within 10 s"))
        self.assertEqual(entry.next_attempt_at, s.web.clock.seconds() + 60)

    async def test_a_webhook_deleted_during_its_attempt_is_not_taken_for_a_takeover(
        self
    ) -> None:
        # Its delivery row goes with it, so the attempt has nothing to record: that is no
        # other node's lease, which single-node operators were warned of.
        s = await self.setup(timeout=10)
        s.receiver.hang = True
        hook, _ = await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        await sync_ended(s.webhooks, s.result(1))
        s.web.clock.advance(0)
        self.assertEqual(len(s.receiver.hanging), 1)
        await s.webhooks.delete(s.alice.user.id, hook.id)
        events: list[dict[str, Any]] = []
        observe: Any = events.append
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        s.web.clock.advance(10)
        lines = [formatEvent(e) for e in events if "webhook delivery" in formatEvent(e)]
        self.assertEqual(lines, ["webhook delivery 1 was removed while it was attempted "
                                 "(its webhook or its user was deleted): nothing to record"])
        self.assertEqual([e["log_level"] for e in events if "webhook delivery" in
                          formatEvent(e)], [LogLevel.info])

    async def test_at_most_concurrency_attempts_at_once(self) -> None:
        s = await self.setup(concurrency=2, timeout=30)
        s.receiver.hang = True
        await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        for _ in range(5):
            await sync_ended(s.webhooks, s.result(1))
        s.web.clock.advance(0)
        s.web.clock.advance(1)
        self.assertEqual(len(s.receiver.received), 2)
        s.web.clock.advance(30)  # both time out; the next two go
        self.assertEqual(len(s.receiver.received), 4)

    async def test_a_dead_receiver_holds_only_its_share_of_the_slots(self) -> None:
        s = await self.setup(concurrency=4, per_webhook=2, timeout=30)
        s.receiver.hang_paths = {b"/dead"}
        dead, _ = await s.webhooks.create(s.alice.user.id, url="https://dead.example.com/dead",
                                          events=["sync.completed"])
        live, _ = await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        for _ in range(6):
            await sync_ended(s.webhooks, s.result(1))
        s.web.clock.advance(0)
        s.web.clock.advance(1)
        self.assertEqual(len(s.receiver.hanging), 2)  # the dead one: two at a time
        self.assertEqual({e.status for e in await s.log(live.id)}, {"success"})
        self.assertEqual(len(await s.log(live.id)), 6)
        self.assertEqual(sorted(e.status for e in await s.log(dead.id)), ["pending"] * 6)

    async def test_one_users_backlog_leaves_room_for_another_user(self) -> None:
        s = await self.setup(concurrency=4, per_webhook=2, per_user=3, timeout=30)
        s.receiver.hang_paths = {b"/in"}  # alice's receivers never answer
        for _ in range(4):
            await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        for _ in range(10):
            await sync_ended(s.webhooks, s.result(1))  # 40 deliveries, all older than bob's
        bob = await client(s.web, "bob")
        bobs, _ = await s.webhooks.create(bob.user.id, url="https://hooks.example.com/bob",
                                          events=["sync.completed"])
        mine = s.result(2)
        mine.user_id = bob.user.id
        await sync_ended(s.webhooks, mine)
        s.web.clock.advance(0)
        self.assertEqual(len(s.receiver.hanging), 3)  # alice: at most per_user at once
        s.web.clock.advance(1)  # the next sweep
        [entry] = list((await s.webhooks.deliveries(bob.user.id, bobs.id)).items)
        self.assertEqual((entry.status, entry.attempts), ("success", 1))
        self.assertEqual(len(s.receiver.hanging), 3)

    async def test_a_dead_receiver_never_delays_the_sync_listener(self) -> None:
        s = await self.setup(timeout=10)
        s.receiver.hang = True
        await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed",
                                                                    "email.new"])
        result = await s.synced([[mail(1)]])
        await self.tell(s, result)
        s.web.clock.advance(0)
        self.assertEqual(len(s.receiver.received), 2)  # sync.completed and email.new
        self.assertEqual(len(s.receiver.hanging), 2)  # still unanswered

    async def test_a_disabled_webhook_cancels_its_queued_deliveries(self) -> None:
        s = await self.setup()
        s.sender.stopService()
        hook, _ = await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        await sync_ended(s.webhooks, s.result(1))
        await s.webhooks.update(s.alice.user.id, hook.id, active=False)
        s.sender.startService()
        s.web.clock.advance(0)
        [entry] = await s.log(hook.id)
        self.assertEqual(entry.status, "cancelled")
        self.assertEqual(s.receiver.received, [])

    async def test_an_address_the_operator_closed_later_is_not_contacted(self) -> None:
        s = await self.setup(allow_loopback=True)
        hook, _ = await s.webhooks.create(s.alice.user.id, url="http://127.0.0.1:9/in",
                                          events=["sync.completed"])
        s.webhooks.policy.settings = WebhookSettings()  # the operator turns loopback off
        await sync_ended(s.webhooks, s.result(1))
        s.web.clock.advance(0)
        [entry] = await s.log(hook.id)
        self.assertEqual((entry.status, entry.attempts), ("failed", 1))
        self.assertIn("does not send webhooks", entry.last_error)
        self.assertEqual(s.receiver.received, [])

    async def test_old_finished_deliveries_are_pruned_hourly_in_batches(self) -> None:
        """The delivery log's prune (WebhookPruner, hourly) deletes the finished
        deliveries past `retention_days`, PRUNE_BATCH a transaction, and leaves pending
        ones. It was one DELETE of them all, holding every row's lock to its end."""
        s = await self.setup(retention_days=1)
        self.patch(delivery_store, "PRUNE_BATCH", 2)
        hook, _ = await s.webhooks.create(s.alice.user.id, url=HOOK, events=["sync.completed"])
        for account in range(1, 6):
            await sync_ended(s.webhooks, s.result(account))
        s.web.clock.advance(0)
        self.assertEqual([d.status for d in await s.log(hook.id)], ["success"] * 5)
        later = s.web.clock.seconds() + 10 * 86400  # not due: the sender leaves it pending

        def pending(conn: Connection) -> None:
            conn.execute(insert(webhook_deliveries).values(
                webhook_id=hook.id, user_id=s.alice.user.id, delivery_uuid="d" * 36,
                event="sync.completed", payload="{}", status="pending",
                next_attempt_at=later, created_at=0.0))

        await s.web.core.db.run("pending", pending)
        pruned = transaction_answers(self, s.webhooks.db, "prune_webhook_deliveries".__eq__)
        pruner = WebhookPruner(s.webhooks, s.web.clock)
        await pruner.tick()  # nothing old enough yet
        self.assertEqual([n for _, n in pruned], [0])
        self.assertEqual(len(await s.log(hook.id)), 6)
        s.web.clock.advance(86400 + 1)
        await pruner.tick()
        self.assertEqual([n for _, n in pruned], [0, 2, 2, 1])  # a transaction for each batch of 2
        self.assertEqual([d.status for d in await s.log(hook.id)], ["pending"])

    async def test_the_prune_reads_no_whole_table(self) -> None:
        """Each batch of the prune finds its rows through ix_webhook_deliveries_completed_at
        (migration 0064): without it each batch read all of webhook_deliveries."""
        s = await self.setup(retention_days=1)
        with engine_query_plans(s.web.core.db.engine) as plans:
            await s.webhooks.prune()
        self.assertTrue(plans)
        self.assertEqual([p for p in plans if re.match(r"SCAN webhook_deliveries\b", p)], [])


class IsoTests(TestCase):
    """`iso` writes times as Django REST framework does: UTC, a Z, microseconds only when
    there are some (orjson writes it; it must match what isoformat() gave)."""

    @settings(max_examples=300, deadline=None)
    @given(st.datetimes(timezones=st.one_of(
        st.none(), st.just(datetime.UTC), st.timezones(),
        st.builds(datetime.timezone, st.timedeltas(datetime.timedelta(hours=-23),
                                                   datetime.timedelta(hours=23))))))
    def test_as_isoformat_in_utc_with_a_z(self, moment: datetime.datetime) -> None:
        aware = moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)
        try:
            in_utc = aware.astimezone(datetime.UTC)
        except OverflowError:
            return  # out of datetime's range once in UTC
        self.assertEqual(iso(moment), in_utc.isoformat()[:-6] + "Z")

    def test_none_and_examples(self) -> None:
        self.assertIsNone(iso(None))
        self.assertEqual(iso(datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)),
                         "2024-05-06T07:08:09Z")
        self.assertEqual(iso(datetime.datetime(2024, 5, 6, 7, 8, 9, 5, tzinfo=datetime.UTC)),
                         "2024-05-06T07:08:09.000005Z")
