"""Deleting a user with everything it owns (`mailcore.deletion`), on SQLite and PostgreSQL.

Alice owns one of every kind of object, Bob owns some that touch hers (a grant on her
mailbox, a mailbox on his domain she holds, a token she gave his app). After her deletion no
row of any table names her, her files are gone from disk, Bob's objects are all there, and
her invoice is kept without her. A deletion cut short after any step leaves her disabled
and marked, refused by `set_active(True)`, and a second run finishes it.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import os
import time
from typing import Any

from sqlalchemy import Connection, insert, select
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.deletion import UserDeletion
from mailcore.identity import IdentityError
from mailcore.messages.models import FetchedMessage, Location
from mailcore.queue.routing import RoutingError
from mailcore.store.schema import (
    credentials,
    drop_files,
    invoices,
    mailapi_mail,
    mailbox_grants,
    mailbox_jobs,
    message_blobs,
    metadata,
    oauth_codes,
    oauth_tokens,
    quarantine,
    users,
    webhook_deliveries,
)
from tests.support.db import DatabaseMixin
from tests.support.servers import tempdir_for
from tests.support.web import make_core

NOW = datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
# A file the Mail API's sweep may take: older than its grace (an hour).
OLD = time.time() - 7200


def message(subject: str) -> bytes:
    return (f"From: someone@example.net\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject}@example.net>\r\n\r\nbody of {subject}\r\n").encode()


def thd_rows_naming(conn: Connection, user_id: int) -> dict[str, int]:
    """Blocking: how many rows of each table name the user (a user_id or owner_id column,
    or the users row itself)."""
    found: dict[str, int] = {}
    for table in metadata.sorted_tables:
        for name in ("user_id", "owner_id"):
            if name in table.c:
                n = len(conn.execute(select(table.c[name]).where(table.c[name] == user_id))
                        .all())
                if n:
                    found[f"{table.name}.{name}"] = n
    if conn.execute(select(users.c.id).where(users.c.id == user_id)).first():
        found["users"] = 1
    return found


class UserDeletionMixin(DatabaseMixin):
    timeout = 120

    async def setUp(self) -> None:  # type: ignore[override]
        url = (await self.open_database()).url
        self.data_dir = tempdir_for(self, "mailcore-deletion-")
        self.core, self.clock = make_core(Config(data_dir=self.data_dir), url)
        self.addCleanup(self.core.db.close)
        self.core.safedrop.files.prepare()
        self.core.mail.files.prepare()
        identity = self.core.identity
        self.alice = await identity.create_user("alice", "alice@example.test", "pw")
        self.bob = await identity.create_user("bob", "bob@example.test", "pw")
        await self.seed()

    @property
    def deletion(self) -> UserDeletion:
        return self.core.deletion

    async def run_sql(self, work: Any) -> Any:
        return await self.core.db.run("test_sql", work)

    async def seed(self) -> None:
        core, alice, bob = self.core, self.alice, self.bob
        # Domains: alice's hosted and relayed ones, bob's hosted one.
        self.a_test = await core.domains.add("a.test", alice.id, "", hosted=True)
        self.relayed = await core.domains.add("r.test", alice.id, "mx.r.test")
        await core.domains.add_address("r.test", "info")
        await core.domains.add("b.test", bob.id, "", hosted=True)
        # Mailboxes: hers on her domain and on bob's, his own; grants both ways.
        self.box = await core.mailboxes.add("box@a.test", alice.id)
        self.her_box_at_bob = await core.mailboxes.add("her@b.test", alice.id)
        self.bob_box = await core.mailboxes.add("bob@b.test", bob.id)
        await core.mailboxes.set_grant(alice.id, "box@a.test", "bob", {"allow_read": True})
        await core.mailboxes.set_grant(bob.id, "bob@b.test", "alice", {"allow_read": True})
        # Mail with files on disk: hers (inbox, draft, outbox), bob's (sharing no file).
        hers = core.mail.files.write(b"alice's inbox message")
        self.her_file = core.mail.files.path(hers.sha256)
        bobs = core.mail.files.write(b"bob's inbox message")
        self.bob_file = core.mail.files.path(bobs.sha256)
        for path in (self.her_file, self.bob_file):
            os.utime(path, (OLD, OLD))
        now = self.clock.seconds()

        def mail(conn: Connection) -> None:
            rows = [
                (self.box.id, "inbox", hers.sha256, None), (self.box.id, "draft", None, None),
                (self.her_box_at_bob.id, "outbox", None, "Q1"),
                (self.bob_box.id, "inbox", bobs.sha256, None),
            ]
            for n, (box, status, sha, queue_id) in enumerate(rows):
                conn.execute(insert(mailapi_mail).values(
                    public_id=f"m{n}", mailbox_id=box, status=status, raw_sha256=sha,
                    queue_id=queue_id, created_at=now,
                    outbox_seq=n if status == "outbox" else None))

        await self.run_sql(mail)
        # Quarantined mail of her domain.

        def held(conn: Connection) -> None:
            conn.execute(insert(quarantine).values(
                ident="0" * 20, owner_id=alice.id, domain_id=self.a_test.id, domain="a.test",
                email="box@a.test", email_key="box", mailfrom="s@x.test", subject="spam",
                category="spam", reason="r", queue_id="Q2", body=b"x", size=1, created_at=NOW))

        await self.run_sql(held)
        # A safedrop bundle with a file on disk.
        bundle = await core.safedrop.create_bundle(alice.id, {"subject": "files"})
        self.bundle_dir = core.safedrop.files.root / str(bundle.id)
        self.bundle_dir.mkdir()
        data = b"a dropped file"
        sha = hashlib.sha256(data).hexdigest()
        (self.bundle_dir / sha).write_bytes(data)

        def dropped(conn: Connection) -> None:
            conn.execute(insert(drop_files).values(
                bundle_id=bundle.id, name="f.txt", content_type="text/plain", size=len(data),
                sha256=sha, created_at=NOW))

        await self.run_sql(dropped)
        # A fetch account with a backed-up message, a migrate job, and a loose message.
        account = await core.fetch.accounts.create(
            alice.id, name="a", email="a@x.test", host="imap.x.test", port=143,
            password="pw", allow_cleartext=True)
        await core.messages.store_batch(
            Location(alice.id, account.id, None, "INBOX"),
            [FetchedMessage(raw=message("backed-up"))])
        await core.messages.add_message(alice.id, message("loose"))
        await core.messages.add_message(bob.id, message("bob's"))

        def job(conn: Connection) -> None:
            conn.execute(insert(mailbox_jobs).values(
                kind="restore", user_id=alice.id, account_id=account.id, created_at=NOW,
                updated_at=NOW))

        await self.run_sql(job)
        # A webhook with a pending delivery.
        hook, _ = await core.webhooks.create(alice.id, url="https://hooks.example.com/in")

        def pending(conn: Connection) -> None:
            conn.execute(insert(webhook_deliveries).values(
                webhook_id=hook.id, user_id=alice.id, delivery_uuid="u" * 36,
                event="sync.completed", payload="{}", status="pending",
                next_attempt_at=now, created_at=now))

        await self.run_sql(pending)
        # OAuth: her app (with bob's token), bob's app (with her code and token).
        her_app, _ = await core.oauth.add_app(alice.id, "hers", ["https://h.example.com/cb"])
        bob_app, _ = await core.oauth.add_app(bob.id, "bobs", ["https://b.example.com/cb"])
        later = NOW + datetime.timedelta(days=1)

        def grants(conn: Connection) -> None:
            for n, (app, user) in enumerate(((her_app.id, bob.id), (bob_app.id, alice.id))):
                conn.execute(insert(oauth_tokens).values(
                    app_id=app, user_id=user, access_digest=bytes([n]) * 32, scopes="read",
                    created_at=NOW, expires_at=later))
            conn.execute(insert(oauth_codes).values(
                app_id=bob_app.id, user_id=alice.id, digest=b"c" * 32, scopes="read",
                created_at=NOW, expires_at=later))

        await self.run_sql(grants)
        # Credentials of every kind, a session made from the API key among them.
        _, key = await core.identity.create_credential(alice.id, "apikey")
        await core.identity.create_credential(alice.id, "session", ttl=60, parent_id=key.id)
        await core.identity.create_credential(alice.id, "token")
        await core.identity.create_credential(alice.id, "token", login=True)
        await core.identity.create_credential(bob.id, "apikey")
        # Billing: tokens and an invoice.
        await core.invoices.buy(alice.id, 10_000, "60")

    async def assertAliceGone(self) -> None:
        self.assertEqual(await self.core.db.read("naming", thd_rows_naming, self.alice.id), {})
        self.assertFalse(self.bundle_dir.exists())
        self.assertFalse(self.her_file.exists())
        self.assertTrue(self.bob_file.exists())
        self.assertIsNone(await self.core.identity.find_user("alice"))

        def left(conn: Connection) -> dict[str, Any]:
            return {
                "invoices": conn.execute(select(invoices.c.user_id, invoices.c.email)).all(),
                "mail": sorted(r[0] for r in conn.execute(select(mailapi_mail.c.public_id))),
                "grants": conn.execute(select(mailbox_grants.c.user_id)).all(),
                "tokens": conn.execute(select(oauth_tokens.c.user_id)).all(),
                "codes": conn.execute(select(oauth_codes.c.id)).all(),
                "credentials": conn.execute(select(credentials.c.user_id)).all(),
                "blobs": conn.execute(select(message_blobs.c.sha256)).all(),
            }

        found = await self.core.db.read("left", left)
        # Her invoice stays, as issued, linked to nobody.
        self.assertEqual([tuple(r) for r in found["invoices"]], [(None, "alice@example.test")])
        self.assertEqual(found["mail"], ["m3"])  # bob's only
        self.assertEqual(found["grants"], [])  # hers on bob's box; bob's on hers went with it
        self.assertEqual(found["tokens"], [])  # bob's on her app went with the app
        self.assertEqual(found["codes"], [])
        self.assertEqual([r[0] for r in found["credentials"]], [self.bob.id])
        self.assertEqual(len(found["blobs"]), 1)  # bob's message's
        # Bob's objects are all there.
        self.assertEqual([d.name for d in await self.core.domains.list()], ["b.test"])
        self.assertEqual([b.address for b in await self.core.mailboxes.list_all()],
                         ["bob@b.test"])
        self.assertEqual([a.name for a in await self.core.oauth.list_apps()], ["bobs"])
        bob = await self.core.identity.get_user(self.bob.id)
        self.assertTrue(bob is not None and bob.is_active)

    async def test_holdings_list_what_the_user_owns(self) -> None:
        held = await self.deletion.holdings(self.alice)
        self.assertEqual(held.domains, ("a.test", "r.test"))
        self.assertEqual(held.mailboxes, ("box@a.test", "her@b.test"))
        self.assertEqual((held.accounts, held.bundles, held.webhooks, held.apps), (1, 1, 1, 1))
        self.assertEqual(held.summary(), "2 domains, 2 mailboxes, 1 fetch account, "
                         "1 safedrop bundle, 1 webhook, 1 OAuth app")

    async def test_everything_she_owns_goes_and_nothing_of_bob(self) -> None:
        removed = await self.deletion.delete(self.alice)
        self.assertTrue(removed.user)
        self.assertEqual(removed.domains, ["a.test", "r.test"])
        self.assertEqual(removed.mailboxes, ["box@a.test", "her@b.test"])
        self.assertEqual(removed.unsent, 1)  # the outbox mail of her box on bob's domain
        self.assertEqual((removed.accounts, removed.messages, removed.bundles,
                          removed.webhooks, removed.apps, removed.oauth_tokens,
                          removed.grants_held, removed.files), (1, 1, 1, 1, 1, 1, 1, 1))
        await self.assertAliceGone()

    async def test_mail_queued_for_her_domain_bounces(self) -> None:
        await self.deletion.delete(self.alice)
        router = self.core.queue.runner.router
        with self.assertRaises(RoutingError) as raised:
            await router.route(self.relayed.id, "info@r.test")
        self.assertTrue(raised.exception.permanent)
        self.assertIn("no longer served", str(raised.exception))

    async def test_a_deletion_cut_short_after_any_step_is_finished_by_the_next(self) -> None:
        steps = [(self.deletion, "_oauth"), (self.deletion, "_webhooks"),
                 (self.deletion, "_accounts"), (self.core.safedrop, "delete_owner_bundles"),
                 (self.deletion, "_domains"), (self.deletion, "_mailboxes"),
                 (self.core.mailboxes, "forget_grantee")]
        marks = []
        for owner, name in steps:
            real = getattr(owner, name)

            async def crash_after(*args: Any, _real: Any = real) -> Any:
                await _real(*args)
                raise SystemExit("killed")

            setattr(owner, name, crash_after)
            try:
                with self.assertRaises(SystemExit):
                    await self.deletion.delete(self.alice)
            finally:
                delattr(owner, name)
            cut = await self.core.identity.get_user(self.alice.id)
            assert cut is not None
            self.assertFalse(cut.is_active)
            marks.append(cut.deleting_at)
            with self.assertRaises(IdentityError):
                await self.core.identity.set_active(self.alice.id, True)
        # Marked once, when the first run began; every run after it went on from there.
        self.assertIsNotNone(marks[0])
        self.assertEqual(set(marks), {marks[0]})
        removed = await self.deletion.delete(self.alice)
        self.assertTrue(removed.user)
        await self.assertAliceGone()

    async def test_a_bundle_whose_files_went_before_a_crash_goes_on_the_next_run(
        self,
    ) -> None:
        # Killed between a bundle's files and its row: the row is found again.
        bundle_id = int(self.bundle_dir.name)
        self.core.safedrop.files.remove_bundle(bundle_id)
        self.assertEqual(await self.core.safedrop.bundle_ids(self.alice.id), [bundle_id])
        await self.deletion.delete(self.alice)
        await self.assertAliceGone()

    async def test_an_upload_finishing_after_its_bundle_went_leaves_no_file(self) -> None:
        bundle_id = int(self.bundle_dir.name)
        body = (b"--b\r\nContent-Disposition: form-data; name=\"the_file\"; "
                b"filename=\"late.txt\"\r\nContent-Type: text/plain\r\n\r\nlate\r\n--b--\r\n")
        safedrop = self.core.safedrop
        real_room = safedrop.upload_room
        entered: list[int] = []

        async def room_then_delete(owner_id: int, bid: int) -> Any:
            found = await real_room(owner_id, bid)
            if not entered:  # the upload has its room; the owner is deleted meanwhile
                entered.append(1)
                await self.deletion.delete(self.alice)
            return found

        safedrop.upload_room = room_then_delete  # type: ignore[method-assign,assignment]
        with self.assertRaises(Exception):
            await safedrop.add_file(self.alice.id, bundle_id,
                                    "multipart/form-data; boundary=b", io.BytesIO(body))
        # The upload took its file back; its directory, empty, is the daemon's sweep's
        # (`_sweep_left_behind`: SQLite may give the id to the next bundle made).
        self.assertEqual(list(self.bundle_dir.iterdir()), [])
        self.bundle_dir.rmdir()
        await self.assertAliceGone()

    async def test_a_deleted_users_account_update_from_a_running_sync_resurrects_nothing(
        self,
    ) -> None:
        [account] = await self.core.fetch.accounts.list_accounts(self.alice.id)
        await self.deletion.delete(self.alice)
        # What a sync that was running writes when it ends: a status, a batch of messages.
        await self.core.fetch.accounts.set_status(account.id, sync_status="success")
        with self.assertRaises(Exception):
            await self.core.messages.store_batch(
                Location(self.alice.id, account.id, None, "INBOX"),
                [FetchedMessage(raw=message("late"))])
        await self.assertAliceGone()

    async def test_enable_refuses_a_user_being_deleted(self) -> None:
        await self.core.identity.begin_deletion(self.alice.id)
        with self.assertRaises(IdentityError) as refused:
            await self.core.identity.set_active(self.alice.id, True)
        self.assertIn("being deleted", refused.exception.message)
        await self.core.identity.set_active(self.alice.id, False)  # disabling is fine

    async def test_finish_deletion_deletes_only_a_marked_user(self) -> None:
        self.assertFalse(await self.core.identity.finish_deletion(self.bob.id))
        self.assertIsNotNone(await self.core.identity.get_user(self.bob.id))


class SQLiteUserDeletionTests(UserDeletionMixin, TestCase):
    backend = "sqlite"


class PostgresUserDeletionTests(UserDeletionMixin, TestCase):
    backend = "postgresql"
