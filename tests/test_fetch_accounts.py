"""Fetch accounts: validation, encrypted passwords that are never returned, the key file,
partial updates, deletion with the messages, and the periodic scheduler on a Clock."""

from __future__ import annotations

import datetime
import os
import re
import stat
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet
from sqlalchemy import Connection, func, select, update
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.config import ConfigError
from mailcore.fetch import AccountError, AccountNotFound, Accounts, FetchSettings, SecretBox
from mailcore.fetch.accounts import DESTINATION_REFUSAL, INTERRUPTED
from mailcore.fetch.engine import SyncEngine, SyncResult, imap_date, limit_since
from mailcore.fetch.scheduler import FetchScheduler
from mailcore.fetch.secrets import KEY_FILE, KeyFileSecretBox, SecretError, check_key_blocking
from mailcore.messages import MessageQuery, MessageStore
from mailcore.store.schema import fetch_accounts, message_blobs, messages, threads, users
from mailcore.workers import CpuPool
from tests.support.db import engine_query_plans, open_database, synchronous_database
from tests.support.fetchenv import thd_make_user
from tests.support.testca import shared_pki

BASE: dict[str, Any] = {"host": "imap.example.test", "username": "me@example.test",
                        "password": "hunter2 ✓"}


class AccountsTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.db = synchronous_database()
        self.user = self.successResultOf(self.db.run("make_user", thd_make_user, "owner"))
        self.accounts = Accounts(self.db, self.clock, SecretBox.generate())

    def create(self, **kw: Any) -> Any:
        return self.successResultOf(
            defer.Deferred.fromCoroutine(self.accounts.create(self.user, **{**BASE, **kw}))
        )

    def refused(self, coro: Any) -> AccountError:
        failure = self.failureResultOf(defer.Deferred.fromCoroutine(coro), AccountError)
        return failure.value  # type: ignore[no-any-return]

    def test_defaults_and_ports(self) -> None:
        imap = self.create()
        self.assertEqual((imap.protocol, imap.port, imap.sync_limit_type, imap.sync_status),
                         ("imap", 143, "all", "never"))
        imaps = self.create(use_ssl=True)
        self.assertEqual(imaps.port, 993)
        pop = self.create(protocol="pop", use_ssl=True)
        self.assertEqual(pop.port, 995)
        drop = self.create(username="", email="me@drop.test", protocol="pop")
        self.assertEqual((drop.username, drop.port), ("me@drop.test", 110))

    def test_a_user_has_at_most_max_per_user_accounts(self) -> None:
        self.accounts.max_per_user = 2
        first = self.create()
        self.create(host="imap2.example.test")
        error = self.refused(self.accounts.create(self.user, **BASE))
        self.assertEqual((error.message, error.field),
                         ("A user may have at most 2 accounts; delete one to add another.", None))
        other = self.successResultOf(self.db.run("make_user", thd_make_user, "other"))
        self.successResultOf(defer.Deferred.fromCoroutine(self.accounts.create(other, **BASE)))
        self.successResultOf(defer.Deferred.fromCoroutine(
            self.accounts.delete(self.user, first.id)))
        self.create()

    def test_password_is_encrypted_and_never_returned(self) -> None:
        account = self.create()
        self.assertFalse(hasattr(account, "password"))
        self.assertNotIn("hunter2", repr(account))

        def stored(conn: Connection) -> bytes:
            return bytes(conn.execute(select(fetch_accounts.c.password_enc)).scalar_one())

        token = self.successResultOf(self.db.read("pw", stored))
        self.assertNotIn(b"hunter2", token)
        _, clear = self.successResultOf(defer.Deferred.fromCoroutine(
            self.accounts.credentials(account.id)))
        self.assertEqual(clear, "hunter2 ✓")

    def test_validation_names_the_field(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"protocol": "smtp"}, "protocol"),
            ({"host": ""}, "host"),
            ({"host": "bad host name"}, "host"),
            ({"password": ""}, "password"),
            ({"use_ssl": True, "start_tls": True}, "start_tls"),
            ({"port": 70000}, "port"),
            ({"sync_limit_type": "years"}, "sync_limit_type"),
            ({"sync_limit_type": "days", "sync_limit_value": 0}, "sync_limit_value"),
            ({"tls_fingerprint": "abc"}, "tls_fingerprint"),
            ({"tls_ca_pem": "not a certificate"}, "tls_ca_pem"),
            ({"sync_interval": 5}, "sync_interval"),
            ({"port": "143"}, "port"),
            ({"use_ssl": "yes"}, "use_ssl"),
            ({"colour": "red"}, "colour"),
        ]
        for values, field in cases:
            error = self.refused(self.accounts.create(self.user, **{**BASE, **values}))
            self.assertEqual(error.field, field, values)

    def test_partial_update_and_password_change(self) -> None:
        account = self.create(name="Mine", folders_to_sync=["INBOX", " Sent "])
        self.assertEqual(account.folder_list, ["INBOX", "Sent"])
        self.clock.advance(60)
        updated = self.successResultOf(defer.Deferred.fromCoroutine(self.accounts.update(
            self.user, account.id, name="Renamed", sync_limit_type="weeks",
            sync_limit_value=2, password="new secret",
        )))
        self.assertEqual((updated.name, updated.host, updated.sync_limit_value),
                         ("Renamed", "imap.example.test", 2))
        self.assertGreater(updated.updated_at, account.updated_at)
        _, clear = self.successResultOf(defer.Deferred.fromCoroutine(
            self.accounts.credentials(account.id)))
        self.assertEqual(clear, "new secret")
        error = self.refused(self.accounts.update(self.user, account.id, start_tls=True,
                                                  use_ssl=True))
        self.assertEqual(error.field, "start_tls")

    def stored(self, account_id: int) -> tuple[Any, str]:
        return self.successResultOf(defer.Deferred.fromCoroutine(  # type: ignore[no-any-return]
            self.accounts.credentials(account_id)))

    def test_a_new_destination_needs_the_password_again(self) -> None:
        """The stored password is never handed to a server, port, protocol, user name or
        certificate the update names, nor sent in cleartext where it was not: such an
        update without the password is refused on "password" and changes nothing."""
        account = self.create(use_ssl=True, tls_fingerprint="ab" * 32)
        changes: list[dict[str, Any]] = [
            {"host": "evil.example.test"},
            {"host": "evil.example.test", "name": "innocent"},
            {"port": 10993},
            {"protocol": "pop"},
            {"username": "someone-else"},
            {"email": "x@example.test", "username": "someone-else"},
            {"tls_fingerprint": "cd" * 32},
            {"tls_fingerprint": None},
            {"tls_ca_pem": shared_pki().ca_pem.decode()},
            {"use_ssl": False, "allow_cleartext": True},
        ]
        for change in changes:
            error = self.refused(self.accounts.update(self.user, account.id, **change))
            self.assertEqual((error.field, error.message), ("password", DESTINATION_REFUSAL),
                             change)
        after, clear = self.stored(account.id)
        self.assertEqual(after, account)
        self.assertEqual(clear, "hunter2 ✓")

    def test_tls_weakened_to_cleartext_step_by_step_needs_the_password(self) -> None:
        """Each step is compared with what is stored: allowing cleartext while TLS is on
        changes nothing yet, and turning TLS off afterwards is then the weakening."""
        account = self.create(start_tls=True)
        allowed = self.successResultOf(defer.Deferred.fromCoroutine(
            self.accounts.update(self.user, account.id, allow_cleartext=True)))
        self.assertTrue(allowed.allow_cleartext)
        error = self.refused(self.accounts.update(self.user, account.id, start_tls=False))
        self.assertEqual(error.field, "password")
        self.assertTrue(self.stored(account.id)[0].start_tls)

    def test_an_unchanged_or_stronger_destination_needs_no_password(self) -> None:
        account = self.create(tls_fingerprint="AB:" * 31 + "AB", allow_cleartext=True)
        as_read = {k: getattr(account, k) for k in (
            "name", "email", "protocol", "host", "port", "username", "use_ssl", "start_tls",
            "allow_cleartext", "tls_ca_pem", "tls_fingerprint")}
        same = self.successResultOf(defer.Deferred.fromCoroutine(self.accounts.update(
            self.user, account.id, **{**as_read, "host": " imap.example.test "})))
        self.assertEqual((same.host, same.tls_fingerprint), (account.host, "ab" * 32))
        stronger = self.successResultOf(defer.Deferred.fromCoroutine(self.accounts.update(
            self.user, account.id, start_tls=True, allow_cleartext=False)))
        self.assertEqual((stronger.start_tls, stronger.allow_cleartext), (True, False))
        self.assertEqual(self.stored(account.id)[1], "hunter2 ✓")

    def test_a_new_destination_with_its_password_is_stored(self) -> None:
        account = self.create()
        moved = self.successResultOf(defer.Deferred.fromCoroutine(self.accounts.update(
            self.user, account.id, host="imap2.example.test", port=10143,
            username="me2", password="for the new server")))
        self.assertEqual((moved.host, moved.port, moved.username),
                         ("imap2.example.test", 10143, "me2"))
        self.assertEqual(self.stored(account.id)[1], "for the new server")

    def test_other_users_accounts_are_invisible(self) -> None:
        account = self.create()
        other = self.successResultOf(self.db.run("make_user", thd_make_user, "other"))
        self.assertIsInstance(self.refused(self.accounts.get(other, account.id)),
                              AccountNotFound)
        self.assertIsInstance(self.refused(self.accounts.delete(other, account.id)),
                              AccountNotFound)
        listed = self.successResultOf(defer.Deferred.fromCoroutine(
            self.accounts.list_accounts(other)))
        self.assertEqual(listed, [])

    def test_list_filters_and_sorts(self) -> None:
        self.create(email="b@x.test", username="b")
        self.create(email="a@x.test", username="a", protocol="pop")
        by_email = self.successResultOf(defer.Deferred.fromCoroutine(
            self.accounts.list_accounts(self.user, sort="email")))
        self.assertEqual([a.email for a in by_email], ["a@x.test", "b@x.test"])
        pops = self.successResultOf(defer.Deferred.fromCoroutine(
            self.accounts.list_accounts(self.user, protocol="pop")))
        self.assertEqual([a.email for a in pops], ["a@x.test"])
        by_count = self.successResultOf(defer.Deferred.fromCoroutine(
            self.accounts.list_accounts(self.user, sort="message_count", direction="desc")))
        self.assertEqual(len(by_count), 2)

    def test_delete_removes_the_account_and_its_messages(self) -> None:
        account = self.create()
        store = MessageStore(self.db, CpuPool.for_tests(), self.clock)
        from mailcore.messages import FetchedMessage, Location

        self.successResultOf(defer.Deferred.fromCoroutine(store.store_batch(
            Location(self.user, account.id, None, "INBOX"),
            [FetchedMessage(raw=b"Subject: x\r\n\r\ny\r\n")],
        )))
        deleted = self.successResultOf(defer.Deferred.fromCoroutine(
            self.accounts.delete(self.user, account.id)))
        self.assertEqual(deleted.id, account.id)
        page = self.successResultOf(defer.Deferred.fromCoroutine(
            store.list_messages(self.user, MessageQuery(q="y"))))
        self.assertEqual(page.count, 0)
        # Its blob went with it: nothing is left to collect.
        removed = self.successResultOf(defer.Deferred.fromCoroutine(store.collect_garbage()))
        self.assertEqual(removed, 0)


    def test_delete_reads_only_the_accounts_rows_and_keeps_what_others_use(self) -> None:
        # It collected every blob and thread no message used, reading every message, blob
        # and thread of every user in its write transaction: 2 s on a store of 400,000
        # messages for an empty account, which a user may create and delete at will.
        store = MessageStore(self.db, CpuPool.for_tests(), self.clock)
        from mailcore.messages import FetchedMessage, Location

        def stored(account_id: int, raws: list[bytes]) -> list[int]:
            result = self.successResultOf(defer.Deferred.fromCoroutine(store.store_batch(
                Location(self.user, account_id, None, "INBOX"),
                [FetchedMessage(raw=r) for r in raws])))
            return result.created

        def mail(n: int, reply_to: int | None = None) -> bytes:
            refs = f"In-Reply-To: <m{reply_to}@x>\r\n" if reply_to else ""
            return f"Message-ID: <m{n}@x>\r\n{refs}Subject: s{n}\r\n\r\nbody {n}\r\n".encode()

        gone, kept = self.create(), self.create(host="imap2.example.test")
        stored(gone.id, [mail(n) for n in range(1, 1201)] + [mail(9001, reply_to=9000)])
        [shared] = stored(kept.id, [mail(1)])  # the same bytes as one of `gone`'s
        [answered] = stored(kept.id, [mail(9000)])  # the thread of `gone`'s last one
        with engine_query_plans(self.db.engine) as plans:
            self.successResultOf(defer.Deferred.fromCoroutine(
                self.accounts.delete(self.user, gone.id)))
        scans = [p for p in plans if re.match(r"SCAN (messages|message_blobs|threads)\b", p)]
        self.assertEqual(scans, [])

        def left(conn: Connection) -> tuple[int, int, set[int]]:
            return (conn.execute(select(func.count()).select_from(messages)).scalar_one(),
                    conn.execute(select(func.count()).select_from(message_blobs)).scalar_one(),
                    set(conn.execute(select(threads.c.id)).scalars()))

        count, blobs, thread_ids = self.successResultOf(self.db.read("left", left))
        self.assertEqual((count, blobs), (2, 2))  # `kept`'s, and only theirs
        held = {self.successResultOf(defer.Deferred.fromCoroutine(
            store.get_message(self.user, i))).summary.thread_id for i in (shared, answered)}
        self.assertEqual(thread_ids, held)

class SecretsTests(TestCase):
    def test_key_file_is_made_once_with_mode_0600(self) -> None:
        directory = Path(self.mktemp())
        box = SecretBox.from_data_dir(directory)
        path = directory / "fetch.key"
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        token = box.encrypt("pw")
        again = SecretBox.from_data_dir(directory)
        self.assertEqual(again.decrypt(token), "pw")

    def test_configured_key_wins_and_wrong_key_fails_clearly(self) -> None:
        key = SecretBox.generate()
        token = key.encrypt("pw")
        with self.assertRaises(SecretError):
            SecretBox.generate().decrypt(token)
        with self.assertRaises(SecretError):
            SecretBox(b"not a key")


class KeyCheckTests(TestCase):
    """The daemon refuses to start with a key that cannot open the stored secrets: a
    missing fetch.key was made anew and a changed one read without a word, and every sync
    then failed, every webhook delivery was given up."""

    def setUp(self) -> None:
        self.data_dir = Path(self.mktemp())
        self.db = synchronous_database(f"sqlite:///{self.mktemp()}.sqlite")
        user = self.successResultOf(self.db.run("make_user", thd_make_user, "owner"))
        self.box = KeyFileSecretBox(self.data_dir)
        self.successResultOf(defer.Deferred.fromCoroutine(
            Accounts(self.db, Clock(), self.box).create(user, **BASE)))

    def check(self, configured: str | None = None) -> None:
        check_key_blocking(self.db.engine, self.data_dir, configured)

    def test_the_key_that_wrote_them_passes(self) -> None:
        self.check()
        key = (self.data_dir / KEY_FILE).read_text().strip()
        (self.data_dir / KEY_FILE).unlink()
        self.check(configured=key)

    def test_an_empty_database_needs_no_key(self) -> None:
        check_key_blocking(synchronous_database().engine, Path(self.mktemp()))

    def test_a_missing_key_file_is_refused_and_not_made(self) -> None:
        (self.data_dir / KEY_FILE).unlink()
        with self.assertRaises(SecretError) as caught:
            self.check()
        self.assertIn("fetch.key is missing", str(caught.exception))
        self.assertFalse((self.data_dir / KEY_FILE).exists())

    def test_another_key_is_refused(self) -> None:
        (self.data_dir / KEY_FILE).write_bytes(Fernet.generate_key())
        with self.assertRaises(SecretError) as caught:
            self.check()
        self.assertIn("does not decrypt the secrets in the database "
                      "(fetch_accounts.password_enc)", str(caught.exception))
        with self.assertRaises(SecretError) as caught:
            self.check(configured=Fernet.generate_key().decode())
        self.assertIn("[fetch] secret_key does not decrypt", str(caught.exception))


class SettingsTests(TestCase):
    def test_section_is_checked(self) -> None:
        settings = FetchSettings.from_section({"sync_interval": 600, "max_concurrent": 2})
        self.assertEqual((settings.sync_interval, settings.max_concurrent), (600.0, 2))
        for bad in ({"nope": 1}, {"max_concurrent": "2"}, {"jitter": 2.0},
                    {"max_concurrent": 0}):
            with self.assertRaises(ConfigError):
                FetchSettings.from_section(bad)

    def test_limit_dates(self) -> None:
        now = datetime.datetime(2024, 3, 31, 12, tzinfo=datetime.UTC)

        def since(kind: str, n: int) -> Any:
            account = type("A", (), {"sync_limit_type": kind, "sync_limit_value": n})()
            return limit_since(account, now)  # type: ignore[arg-type]

        self.assertEqual(since("days", 30), datetime.date(2024, 3, 1))
        self.assertEqual(since("weeks", 1), datetime.date(2024, 3, 24))
        self.assertEqual(since("months", 2), datetime.date(2024, 1, 28))
        self.assertIsNone(since("all", 0))
        # Limits the API takes that reach back past year 1000 (an IMAP date's four-digit
        # year) or past year 1 (datetime's: OverflowError, ValueError) are no limit at all.
        self.assertEqual(since("months", 12_290), datetime.date(1000, 1, 28))
        for kind in ("days", "weeks", "months"):
            self.assertIsNone(since(kind, 1_000_000))
        self.assertIsNone(since("days", 400_000))  # year 929: "SINCE 28-Mar-929" is a BAD
        self.assertIsNone(since("months", 12_291))
        self.assertEqual(imap_date(datetime.date(2024, 2, 5)), "5-Feb-2024")


class FakeEngine(SyncEngine):
    """A SyncEngine whose syncs are Deferreds the test fires by hand."""

    def __init__(self, clock: Clock, accounts: Accounts, settings: FetchSettings) -> None:
        super().__init__(clock, accounts.db, accounts, None, settings)  # type: ignore[arg-type]
        self.started: list[int] = []
        self.gates: dict[int, defer.Deferred[None]] = {}

    async def _sync(self, account_id: int) -> SyncResult:
        self.started.append(account_id)
        gate: defer.Deferred[None] = defer.Deferred()
        self.gates[account_id] = gate
        await self.accounts.set_status(account_id, sync_started_at=self.now())
        await gate
        return SyncResult(account_id=account_id, user_id=0, started_at=self.now(),
                          status="success")


class SchedulerTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.db = synchronous_database()
        user = self.successResultOf(self.db.run("make_user", thd_make_user, "owner"))
        self.accounts = Accounts(self.db, self.clock, SecretBox.generate())
        self.ids = [
            self.successResultOf(defer.Deferred.fromCoroutine(self.accounts.create(
                user, **{**BASE, "username": f"u{i}"}))).id
            for i in range(5)
        ]
        settings = FetchSettings(sync_interval=600, jitter=0.1, max_concurrent=2, tick=30)
        self.engine = FakeEngine(self.clock, self.accounts, settings)
        import random

        self.scheduler = FetchScheduler(self.engine, rng=random.Random(1))

    def release_all(self) -> None:
        for gate in list(self.engine.gates.values()):
            if not gate.called:
                gate.callback(None)

    def test_bounded_concurrency_then_periodic_with_jitter(self) -> None:
        self.scheduler.startService()
        # All five are due; only two run at once.
        self.assertEqual(self.engine.started, self.ids[:2])
        self.assertEqual(self.engine.running(), self.ids)
        self.release_all()
        self.assertEqual(self.engine.started, self.ids[:4])
        self.release_all()
        self.release_all()
        self.assertEqual(sorted(self.engine.started), sorted(self.ids))
        self.assertEqual(self.engine.running(), [])
        # Nothing is due before the interval (minus the jitter) has passed.
        self.clock.advance(30)
        self.assertEqual(len(self.engine.started), 5)
        self.clock.advance(540 - 30 - 1)
        self.assertEqual(len(self.engine.started), 5)
        for _ in range(10):
            self.clock.advance(30)
            self.release_all()
        self.assertEqual(len(self.engine.started), 10)
        self.scheduler.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_disabled_users_accounts_are_not_synced(self) -> None:
        """`mailcore user disable` stops the user's scheduled syncs (the mailboxes of a
        taken-over account are not fetched on), and `enable` brings them back."""
        owner = self.successResultOf(self.db.read(
            "owner", lambda c: c.execute(select(fetch_accounts.c.user_id)).scalar()))

        def active(value: bool) -> None:
            self.successResultOf(self.db.run("active", lambda c: c.execute(
                update(users).where(users.c.id == owner).values(is_active=value))))

        active(False)
        self.scheduler.startService()
        self.assertEqual(self.engine.started, [])
        active(True)
        self.clock.advance(30)
        self.assertEqual(self.engine.started, self.ids[:2])
        self.release_all()
        self.release_all()
        self.release_all()
        self.scheduler.stopService()

    def test_syncs_shown_running_but_running_nowhere_are_shown_failed(self) -> None:
        """A sync killed with its process stayed `running` until its account's next sync;
        the scheduler's start and each tick show it failed: this node's that it does not
        run, and any other node's whose lease has lapsed. A live lease of another node, and
        this node's running sync, stay running."""
        now = self.clock.seconds()
        leases = [("local", now + 300), ("other", now - 1), ("other", now + 300), (None, None)]

        def thd_lease(conn: Connection, account_id: int, owner: str | None,
                      until: float | None) -> None:
            conn.execute(update(fetch_accounts).where(fetch_accounts.c.id == account_id)
                         .values(sync_status="running", lease_owner=owner, lease_until=until,
                                 progress_folder="INBOX"))

        for account_id, (owner, until) in zip(self.ids, leases, strict=False):
            self.successResultOf(self.db.run("lease", thd_lease, account_id, owner, until))
        running = self.engine.sync(self.ids[4])  # this node's sync, running here
        self.successResultOf(self.db.run("lease", lambda c: c.execute(
            update(fetch_accounts).where(fetch_accounts.c.id == self.ids[4]).values(
                sync_status="running", lease_owner="local", lease_until=now + 300))))
        self.successResultOf(defer.Deferred.fromCoroutine(
            self.scheduler.settle_interrupted()))
        shown = self.successResultOf(self.db.read("shown", lambda c: c.execute(
            select(fetch_accounts.c.id, fetch_accounts.c.sync_status,
                   fetch_accounts.c.sync_error, fetch_accounts.c.progress_folder)
            .order_by(fetch_accounts.c.id)).all()))
        failed = ("error", INTERRUPTED, None)
        self.assertEqual([tuple(row[1:]) for row in shown],
                         [failed, failed, ("running", None, "INBOX"), failed,
                          ("running", None, None)])
        self.release_all()
        self.successResultOf(running)

    def test_on_demand_sync_joins_the_running_one(self) -> None:
        first = self.engine.sync(self.ids[0])
        second = self.engine.sync(self.ids[0])
        self.assertEqual(self.engine.started, [self.ids[0]])
        self.release_all()
        self.assertIs(self.successResultOf(first).account_id, self.ids[0])
        self.assertEqual(self.successResultOf(second).account_id, self.ids[0])


class PerUserSlotTests(TestCase):
    """One user's accounts take at most `max_concurrent_per_user` of the engine's slots:
    a user with many accounts, or with a server holding each sync up to the command
    deadline, leaves the other slots to the other users."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.db = synchronous_database()
        self.accounts = Accounts(self.db, self.clock, SecretBox.generate())
        self.ids: dict[str, list[int]] = {}
        for name, count in (("mallory", 5), ("bob", 1), ("carol", 1)):
            user = self.successResultOf(self.db.run("make_user", thd_make_user, name))
            self.ids[name] = [
                self.successResultOf(defer.Deferred.fromCoroutine(self.accounts.create(
                    user, **{**BASE, "username": f"{name}{i}"}))).id
                for i in range(count)
            ]
        self.engine = FakeEngine(self.clock, self.accounts, FetchSettings(
            sync_interval=600, jitter=0.1, max_concurrent=4, tick=30))

    def release(self, account_id: int) -> None:
        self.engine.gates[account_id].callback(None)

    def test_one_users_accounts_leave_slots_to_the_others(self) -> None:
        scheduler = FetchScheduler(self.engine)
        scheduler.startService()
        mallory, bob, carol = self.ids["mallory"], self.ids["bob"], self.ids["carol"]
        # Before, mallory's first four took every slot: bob's and carol's waited for them.
        self.assertEqual(self.engine.started, [*mallory[:2], *bob, *carol])
        self.assertEqual(self.engine.running(), sorted([*mallory, *bob, *carol]))
        self.release(bob[0])
        self.release(carol[0])
        self.assertEqual(self.engine.started, [*mallory[:2], *bob, *carol])  # mallory's wait
        self.release(mallory[0])
        self.assertEqual(self.engine.started[-1], mallory[2])
        for account_id in mallory[1:]:
            self.release(account_id)
        self.assertEqual(self.engine.started, [*mallory[:2], *bob, *carol, *mallory[2:]])
        self.assertEqual((self.engine.running(), self.engine._per_user), ([], {}))
        scheduler.stopService()

    def test_a_sync_asked_for_is_counted_with_its_owners(self) -> None:
        """A sync asked for through an API (no owner given) is its owner's too; stopping
        the engine cancels those waiting as those running."""
        mallory, bob = self.ids["mallory"], self.ids["bob"]
        syncs = [self.engine.sync(account_id) for account_id in [*mallory, *bob]]
        self.assertEqual(self.engine.started, [*mallory[:2], *bob])
        stopped = defer.Deferred.fromCoroutine(self.engine.stop())
        self.successResultOf(stopped)
        for d in syncs:
            self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.engine.started, [*mallory[:2], *bob])
        self.assertEqual((self.engine.running(), self.engine._per_user), ([], {}))

    def test_the_bound_is_a_setting(self) -> None:
        settings = FetchSettings.from_section({"max_concurrent_per_user": 3})
        self.assertEqual((settings.max_concurrent, settings.max_concurrent_per_user), (4, 3))
        self.assertEqual(FetchSettings().max_concurrent_per_user, 2)
        with self.assertRaises(ConfigError):
            FetchSettings.from_section({"max_concurrent_per_user": 0})

    def test_unset_it_is_half_of_max_concurrent(self) -> None:
        """An operator who raised max_concurrent (16, for a few users' many accounts) and
        set no bound of one user's got 2 syncs at once for each, 8 x slower, unwarned (R3's
        review of fc58564): unset, the bound is half of max_concurrent, at least 1."""
        def bound(section: dict[str, int]) -> tuple[int, int]:
            settings = FetchSettings.from_section(section)
            return settings.max_concurrent, settings.max_concurrent_per_user

        self.assertEqual(bound({"max_concurrent": 16}), (16, 8))
        self.assertEqual(bound({"max_concurrent": 1}), (1, 1))
        self.assertEqual(bound({"max_concurrent": 3}), (3, 1))
        self.assertEqual(bound({}), (4, 2))
        self.assertEqual(bound({"max_concurrent": 16, "max_concurrent_per_user": 3}), (16, 3))


class UndecryptablePasswordTests(TestCase):
    def test_sync_reports_a_password_the_key_cannot_open(self) -> None:
        clock = Clock()
        db = synchronous_database()
        user = self.successResultOf(db.run("make_user", thd_make_user, "owner"))
        created = self.successResultOf(defer.Deferred.fromCoroutine(
            Accounts(db, clock, SecretBox.generate()).create(user, **BASE)))
        other_key = Accounts(db, clock, SecretBox.generate())
        engine = SyncEngine(clock, db, other_key,
                            MessageStore(db, CpuPool.for_tests(), clock))
        result = self.successResultOf(engine.sync(created.id))
        self.assertEqual(result.status, "error")
        self.assertIn("cannot be decrypted", result.error or "")
        stored = self.successResultOf(defer.Deferred.fromCoroutine(
            other_key.get(user, created.id)))
        self.assertEqual(stored.sync_status, "error")


class PostgreSQLRoomTests(TestCase):
    """The per-user account limit under concurrent creates, on a real PostgreSQL."""

    timeout = 240

    async def test_concurrent_creates_keep_the_per_user_limit(self) -> None:
        # Each create counted the user's accounts, then inserted: under READ COMMITTED
        # every concurrent create counted the same rows, and 40 at once with room for 5
        # made 40 accounts.
        db = await open_database(self, "postgresql", max_threads=8)
        user = await db.run("make_user", thd_make_user, "owner")
        accounts = Accounts(db, Clock(), SecretBox.generate(), max_per_user=5)
        results = await defer.DeferredList([
            defer.Deferred.fromCoroutine(
                accounts.create(user, **{**BASE, "host": f"imap{i}.example.test"}))
            for i in range(40)
        ], consumeErrors=True)
        self.assertEqual(sum(1 for ok, _ in results if ok), 5)
        refused: list[Any] = [r for ok, r in results if not ok]
        self.assertEqual({type(f.value) for f in refused}, {AccountError})
        self.assertEqual(len(await accounts.list_accounts(user)), 5)
