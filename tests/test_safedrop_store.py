"""safedrop's store under concurrency: a bundle being sent takes no change in the meantime
(mailcore.safedrop.store), on PostgreSQL, where writers do not wait for each other's reads
as SQLite's do."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Connection
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mailcore.safedrop import access, store
from mailcore.safedrop.model import DropError, DropSent, TooLarge
from mailcore.store.schema.identity import users
from mailcore.store.schema.safedrop import drop_bundles, drop_files, drop_recipients
from tests.support.db import DatabaseMixin, engine_query_plans, full_scans, open_database
from tests.support.pg import create_test_database
from tests.support.reactor import get_reactor
from tests.test_web_safedrop_api import MULTIPART, SafedropFixture, multipart_file

NOW = datetime.datetime(2026, 12, 5, 10, 0, tzinfo=datetime.UTC)


def _unsent_bundle_txn(conn: Connection) -> dict[str, int]:
    """An unsent bundle of alice's with one recipient and one file."""
    owner = conn.execute(sa.insert(users).values(
        username="alice", email="alice@example.test", nic="N1", created_at=NOW,
    ).returning(users.c.id)).scalar_one()
    bundle = conn.execute(sa.insert(drop_bundles).values(
        owner_id=owner, subject="before", message="m", email_receipt_when=4,
        read_remove=True, allow_comments=False, require_token_auth=False, created_at=NOW,
    ).returning(drop_bundles.c.id)).scalar_one()
    recipient = conn.execute(sa.insert(drop_recipients).values(
        bundle_id=bundle, email="ann@example.org", telephone="", valid_for=0,
    ).returning(drop_recipients.c.id)).scalar_one()
    conn.execute(sa.insert(drop_files).values(
        bundle_id=bundle, name="a", content_type="application/octet-stream", size=1,
        sha256="a" * 64, created_at=NOW))
    return {"owner": owner, "bundle": bundle, "recipient": recipient}


class ChangeWhileSendingTests(TestCase):
    timeout = 60

    async def change_while_sent(self, change: Callable[..., Any], *args: Any) -> None:
        """Run `change(conn, owner, bundle, *args)` while another transaction is sending
        the bundle (its sent_at written, not yet committed), then let the send commit: the
        change must be refused as DropSent, as it is once the send has committed."""
        db = await open_database(self, "postgresql")
        ids = await db.run("bundle", _unsent_bundle_txn)
        sending = db.engine.connect()
        self.addCleanup(sending.close)
        sending.begin()
        sending.execute(sa.update(drop_bundles).where(drop_bundles.c.id == ids["bundle"])
                        .values(sent_at=NOW))
        changed = db.run("change", change, ids["owner"], ids["bundle"], *args)
        outcome: list[Any] = []
        changed.addBoth(outcome.append)
        await deferLater(get_reactor(), 0.5, lambda: None)  # the change waits on the send
        sending.commit()
        while not outcome:
            await deferLater(get_reactor(), 0.05, lambda: None)
        self.assertIsInstance(getattr(outcome[0], "value", outcome[0]), DropSent)
        row = await db.read("row", lambda c: c.execute(
            sa.select(drop_bundles.c.subject, drop_bundles.c.password_hash)
            .where(drop_bundles.c.id == ids["bundle"])).one())
        self.assertEqual(tuple(row), ("before", None))
        recipient = await db.read("rcpt", lambda c: c.execute(
            sa.select(drop_recipients.c.telephone)
            .where(drop_recipients.c.id == ids["recipient"])).scalar_one())
        self.assertEqual(recipient, "")

    async def test_a_bundle_change_racing_its_send_is_refused(self) -> None:
        await self.change_while_sent(store.update_bundle_txn,
                                     {"subject": "after", "password_hash": "x"})

    async def test_a_recipient_change_racing_its_send_is_refused(self) -> None:
        def change(conn: Connection, owner: int, bundle: int) -> Any:
            recipient = conn.execute(sa.select(drop_recipients.c.id).where(
                drop_recipients.c.bundle_id == bundle)).scalar_one()
            return store.update_recipient_txn(conn, owner, bundle, recipient,
                                              {"telephone": "442077394252"})

        await self.change_while_sent(change)

    async def test_the_whole_api_on_postgresql_with_the_lock(self) -> None:
        """Upload (its room read on the read lane), recipient, send, then 405s."""
        f = SafedropFixture()
        await f.start(self, await create_test_database(self))
        bundle_id = await f.bundle()
        status, _, reply = await f.call("POST", f"/dropbundles/{bundle_id}/dropfiles",
                                        multipart_file("a.txt", b"data"), MULTIPART)
        self.assertEqual(status, 200, reply)
        status, reply = await f.form("POST", f"/dropbundles/{bundle_id}/dropbundlerecipients",
                                     "email=ann%40example.org")
        self.assertEqual(status, 200, reply)
        status, _, _ = await f.call("GET", f"/dropbundles/{bundle_id}?send")
        self.assertEqual(status, 200)
        status, _ = await f.form("PUT", f"/dropbundles/{bundle_id}", "subject=late")
        self.assertEqual(status, 405)
        status, _, _ = await f.call("POST", f"/dropbundles/{bundle_id}/dropfiles",
                                    multipart_file("b.txt", b"more"), MULTIPART)
        self.assertEqual(status, 405)


class OpenWhileOpeningTests(TestCase):
    timeout = 60

    async def opened_while_opening(self, when: int) -> Any:
        """A recipient's link opened (viewed) while another opening of it is recorded and
        not yet committed; what the second opening finds once the first commits."""
        db = await open_database(self, "postgresql")
        ids = await db.run("bundle", _unsent_bundle_txn)
        digest = b"d" * 32
        await db.run("sent", lambda c: (
            c.execute(sa.update(drop_bundles).where(drop_bundles.c.id == ids["bundle"])
                      .values(sent_at=NOW, email_receipt_when=when)),
            c.execute(sa.update(drop_recipients)
                      .where(drop_recipients.c.id == ids["recipient"])
                      .values(link_digest=digest))))
        first = db.engine.connect()
        self.addCleanup(first.close)
        first.begin()
        told = access.open_link_txn(first, digest, NOW, True).tell_opened
        self.assertTrue(told)
        opened = db.run("open", access.open_link_txn, digest, NOW, True)
        outcome: list[Any] = []
        opened.addBoth(outcome.append)
        await deferLater(get_reactor(), 0.5, lambda: None)  # it waits on the first
        first.commit()
        while not outcome:
            await deferLater(get_reactor(), 0.05, lambda: None)
        return outcome[0]

    async def test_two_first_openings_at_once_tell_the_sender_once(self) -> None:
        """email_receipt_when=2 (the first open per recipient): on PostgreSQL two openings
        at once both read the recipient unopened and both mailed the sender its receipt."""
        found = await self.opened_while_opening(2)
        self.assertFalse(found.first_open)
        self.assertFalse(found.tell_opened)

    async def test_two_openings_at_once_tell_the_sender_once_an_hour(self) -> None:
        """email_receipt_when=1 (each open, at most one receipt an hour)."""
        found = await self.opened_while_opening(1)
        self.assertFalse(found.tell_opened)


class DoneWhileDoneTests(TestCase):
    timeout = 60

    async def test_the_last_two_recipients_finishing_at_once_make_one_all_done(
            self) -> None:
        """Every recipient has every file once the last one gets its last file: then the
        sender's receipt (email_receipt_when=4) and, under read_remove, the drop's removal.
        On PostgreSQL two recipients finishing at once each counted the other as pending,
        so neither saw it: no receipt ever, and the files stayed until the expiry sweep,
        which mailed "Your drop has expired" instead."""
        db = await open_database(self, "postgresql")
        ids = await db.run("bundle", _unsent_bundle_txn)

        def second_recipient_and_send(conn: Connection) -> tuple[int, int]:
            bob = conn.execute(sa.insert(drop_recipients).values(
                bundle_id=ids["bundle"], email="bob@example.net", telephone="", valid_for=0,
            ).returning(drop_recipients.c.id)).scalar_one()
            conn.execute(sa.update(drop_bundles).where(drop_bundles.c.id == ids["bundle"])
                         .values(sent_at=NOW))
            file_id = conn.execute(sa.select(drop_files.c.id).where(
                drop_files.c.bundle_id == ids["bundle"])).scalar_one()
            return bob, file_id

        bob, file_id = await db.run("bob", second_recipient_and_send)
        first = db.engine.connect()
        self.addCleanup(first.close)
        first.begin()
        ann_done = access.record_sent_txn(first, ids["recipient"], ids["bundle"], file_id, 1,
                                          0, 0, NOW)
        self.assertEqual((ann_done.recipient_done, ann_done.all_done), (True, False))
        recorded = db.run("bob", access.record_sent_txn, bob, ids["bundle"], file_id, 1, 0, 0,
                          NOW)
        outcome: list[Any] = []
        recorded.addBoth(outcome.append)
        await deferLater(get_reactor(), 0.5, lambda: None)
        first.commit()
        while not outcome:
            await deferLater(get_reactor(), 0.05, lambda: None)
        self.assertEqual(outcome[0], access.Downloaded(True, True, True))


class UploadsOfOneUserTests(TestCase):
    timeout = 60

    async def test_two_uploads_at_once_to_two_bundles_stay_within_max_user_size(
            self) -> None:
        """`[safedrop] max_user_size` bounds the bytes of all a user's drops. The
        transaction that records an upload held only its bundle's row, so on PostgreSQL two
        uploads to two bundles of the user, recorded at once, each counted the user's bytes
        without the other's and both went in, past the limit (by up to
        max_concurrent_uploads files a node)."""
        db = await open_database(self, "postgresql")
        ids = await db.run("bundle", _unsent_bundle_txn)  # its file: 1 byte
        other = await db.run("other", lambda c: c.execute(sa.insert(drop_bundles).values(
            owner_id=ids["owner"], subject="other", message="", email_receipt_when=4,
            read_remove=True, allow_comments=False, require_token_auth=False,
            created_at=NOW).returning(drop_bundles.c.id)).scalar_one())

        def upload(size: int, sha: str) -> dict[str, Any]:
            return {"name": sha, "content_type": "application/octet-stream", "size": size,
                    "sha256": sha * 64, "created_at": NOW}

        limit = 100
        first = db.engine.connect()
        self.addCleanup(first.close)
        first.begin()
        store.add_file_txn(first, ids["owner"], ids["bundle"], upload(60, "b"), 10**9, limit,
                           1000)
        recorded = db.run("second", store.add_file_txn, ids["owner"], other,
                          upload(60, "c"), 10**9, limit, 1000)
        outcome: list[Any] = []
        recorded.addBoth(outcome.append)
        await deferLater(get_reactor(), 0.5, lambda: None)
        first.commit()
        while not outcome:
            await deferLater(get_reactor(), 0.05, lambda: None)
        self.assertIsInstance(getattr(outcome[0], "value", outcome[0]), TooLarge)
        stored = await db.read("sum", store.user_stored_txn, ids["owner"])
        self.assertEqual(stored, 61)


class UnsentCountMixin(DatabaseMixin):
    async def test_the_cap_counts_the_unsent_bundles_through_their_own_index(self) -> None:
        """`[safedrop] max_bundles_per_user` counts the owner's bundles not yet sent at each
        create. Through ix_drop_bundles_owner (owner_id, id) alone, that count read an
        index entry and a row of every bundle the owner ever sent: a million sent drops, a
        million of each at every create. ix_drop_bundles_owner_unsent (migration 0067)
        holds the unsent bundles only."""
        db = await self.open_database()
        ids = await db.run("bundle", _unsent_bundle_txn)

        def sent_one(conn: Connection) -> None:
            conn.execute(sa.insert(drop_bundles).values(
                owner_id=ids["owner"], subject="sent", message="", email_receipt_when=4,
                read_remove=False, allow_comments=False, require_token_auth=False,
                created_at=NOW, sent_at=NOW))

        await db.run("sent", sent_one)
        values = {"subject": "s", "message": "", "email_receipt_when": 4,
                  "read_remove": False, "allow_comments": False,
                  "require_token_auth": False, "created_at": NOW}
        with engine_query_plans(db.engine) as plans:
            await db.run("create", store.create_bundle_txn, ids["owner"], values, 2)
            with self.assertRaises(DropError):
                await db.run("create", store.create_bundle_txn, ids["owner"], values, 2)
        self.assertEqual(full_scans(plans, "drop_bundles"), [])
        self.assertTrue([p for p in plans if "ix_drop_bundles_owner_unsent" in p], plans)


class SQLiteUnsentCountTests(UnsentCountMixin, TestCase):
    backend = "sqlite"


class PostgresUnsentCountTests(UnsentCountMixin, TestCase):
    backend = "postgresql"
