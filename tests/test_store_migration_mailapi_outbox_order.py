"""Migration 0029: a Mail API mail's place in the outbox's order (`outbox_seq`). Mail already
in the outbox keeps the order it was going to be sent in, and mail put in the outbox after
the upgrade comes after it; the way down drops the place and keeps the rows.

Each test runs on SQLite and on PostgreSQL (where the places come from a sequence).
"""

from __future__ import annotations

import datetime

from sqlalchemy import Connection, insert, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.mailapi.mail import thd_next_outbox_seq
from mailcore.mailapi.outbox import thd_outbox
from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from mailcore.store.schema import domains
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user

BEFORE = "0028_account_list_indexes"  # the revision 0029_mailapi_outbox_order builds on


def thd_mail(conn: Connection, statuses: list[str]) -> None:
    """Blocking: a mailbox of the domain hosted.test with one mail of each status, in this
    order (as 0028 stored them: ids in creation order, no place in the outbox)."""
    owner = thd_make_user(conn, "owner")
    conn.execute(insert(domains).values(
        owner_id=owner, name="hosted.test", redirect_host="mx.hosted.test", redirect_port=25,
        created_at=datetime.datetime.fromtimestamp(0, datetime.UTC)))
    box = conn.execute(text("INSERT INTO mailboxes (address, owner_id, created_at)"
                            " VALUES ('me@hosted.test', :o, 1.0) RETURNING id"),
                       {"o": owner}).scalar_one()
    for n, status in enumerate(statuses):
        conn.execute(text(
            "INSERT INTO mailapi_mail (public_id, mailbox_id, status, mail_from, to_addrs,"
            " raw, queue_id, created_at) VALUES (:p, :b, :s, 'me@hosted.test',"
            " 'you@far.test', :raw, :q, 1.0)"),
            {"p": f"m{n}", "b": box, "s": status, "raw": b"Subject: hi\r\n\r\nbody\r\n",
             "q": f"Q{n}" if status != "draft" else None})


def thd_places(conn: Connection) -> dict[str, int | None]:
    return dict(conn.execute(text("SELECT public_id, outbox_seq FROM mailapi_mail")).all())


def thd_put_in_outbox(conn: Connection, public_id: str) -> None:
    """Blocking: a draft enters the outbox as mailcore.mailapi.mail puts it there."""
    conn.execute(text("UPDATE mailapi_mail SET status = 'outbox', queue_id = :q,"
                      " outbox_seq = :seq WHERE public_id = :p"),
                 {"q": f"Q-{public_id}", "seq": thd_next_outbox_seq(conn), "p": public_id})


def thd_columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("mailapi_mail")}


def thd_indexes(conn: Connection) -> dict[str, list[str | None]]:
    return {i["name"]: i["column_names"] for i in inspect(conn).get_indexes("mailapi_mail")
            if i["name"] is not None}


class MailApiOutboxOrderMigrationMixin(DatabaseMixin):
    async def at_0028(self) -> Database:
        return await self.open_database_before(BEFORE)

    async def test_outbox_mail_keeps_its_order_and_later_mail_goes_after_it(self) -> None:
        db = await self.at_0028()
        self.assertNotIn("outbox_seq", await db.read("columns", thd_columns))
        await db.run("mail", thd_mail, ["draft", "outbox", "sent", "outbox", "inbox"])
        await threads.deferToThread(db.migrate_blocking)
        # Only the outbox mail has a place, in the order of its ids.
        places = {p: seq for p, seq in (await db.read("places", thd_places)).items()
                  if seq is not None}
        self.assertEqual(sorted(places, key=places.__getitem__), ["m1", "m3"])
        # The draft written first enters the outbox now: it goes after both.
        await db.run("put", thd_put_in_outbox, "m0")
        rows = await db.read("outbox", thd_outbox, 10)
        self.assertEqual([row[2] for row in rows], ["Q1", "Q3", "Q-m0"])
        indexes = await db.read("indexes", thd_indexes)
        self.assertEqual((indexes.get("ix_mailapi_mail_outbox"),
                          "ix_mailapi_mail_status" in indexes),
                         (["status", "mailbox_id", "outbox_seq"], False))

    async def test_places_drawn_later_are_larger(self) -> None:
        db = await self.open_database()
        drawn = [await db.run("next", thd_next_outbox_seq) for _ in range(3)]
        self.assertEqual(drawn, sorted(set(drawn)))

    async def test_downgrade_drops_the_place_and_keeps_the_rows(self) -> None:
        db = await self.open_database()
        await db.run("mail", thd_mail, ["draft", "outbox"])
        await db.run("put", thd_put_in_outbox, "m0")
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("outbox_seq", await db.read("columns", thd_columns))
        indexes = await db.read("indexes", thd_indexes)
        self.assertEqual((indexes.get("ix_mailapi_mail_status"),
                          "ix_mailapi_mail_outbox" in indexes),
                         (["status", "mailbox_id", "id"], False))
        self.assertEqual(sorted(await db.read("places", lambda c: c.execute(text(
            "SELECT public_id, status FROM mailapi_mail")).all())),
            [("m0", "outbox"), ("m1", "outbox")])
        # Up again: the outbox as it stood (in id order, as 0028 sent it), then new mail.
        await threads.deferToThread(db.migrate_blocking)
        rows = await db.read("outbox", thd_outbox, 10)
        self.assertEqual([row[2] for row in rows], ["Q-m0", "Q1"])
        self.assertGreater(await db.run("next", thd_next_outbox_seq),
                           max(p for p in (await db.read("places", thd_places)).values()
                               if p is not None))


class SQLiteMailApiOutboxOrderMigrationTests(MailApiOutboxOrderMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresMailApiOutboxOrderMigrationTests(MailApiOutboxOrderMigrationMixin, TestCase):
    backend = "postgresql"
