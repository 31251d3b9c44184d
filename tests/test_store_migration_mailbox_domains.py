"""Migration 0037: a Mail API mailbox belongs to the domain row it was created under
(`mailboxes.domain_id`). The upgrade binds each mailbox to the domain now named as its
address's domain, unless that row is younger than the mailbox (its own domain was removed
and the name claimed again); the mailboxes' grants and mail survive the SQLite rebuild, on
the way up and down.

Each test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import datetime

from sqlalchemy import Connection, insert, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.mailapi.delivery import thd_hosted
from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from mailcore.store.schema import domains
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user

BEFORE = "0036_drop_download_attempts"  # the revision 0037_mailbox_domain_rows builds on
T0 = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)


def thd_world(conn: Connection) -> dict[str, int]:
    """Blocking, at 0034: alice's x.test (since T0) with bob@x.test made a day later (one
    grant, one mail); carol's y.test claimed a day after alice's old@y.test was made (the
    row alice made it under is gone); gone@z.test of a domain no longer there. The ids."""
    alice = thd_make_user(conn, "alice")
    carol = thd_make_user(conn, "carol")
    ids = {"alice": alice, "carol": carol}
    for name, owner, since in (("x.test", alice, T0),
                               ("y.test", carol, T0 + datetime.timedelta(days=2))):
        ids[name] = conn.execute(insert(domains).values(
            owner_id=owner, name=name, redirect_host="mx.test", redirect_port=25,
            created_at=since).returning(domains.c.id)).scalar_one()
    made = T0.timestamp() + 86400.0
    for address in ("bob@x.test", "old@y.test", "gone@z.test"):
        ids[address] = conn.execute(text(
            "INSERT INTO mailboxes (address, owner_id, created_at) VALUES (:a, :o, :c)"
            " RETURNING id"), {"a": address, "o": alice, "c": made}).scalar_one()
    conn.execute(text("INSERT INTO mailbox_grants (mailbox_id, user_id, allow_read)"
                      " VALUES (:b, :u, :r)"), {"b": ids["bob@x.test"], "u": carol, "r": True})
    conn.execute(text("INSERT INTO mailapi_mail (public_id, mailbox_id, status, created_at)"
                      " VALUES ('m1', :b, 'inbox', 1.0)"), {"b": ids["bob@x.test"]})
    return ids


def thd_bindings(conn: Connection) -> dict[str, int | None]:
    return dict(conn.execute(text("SELECT address, domain_id FROM mailboxes")).all())


def thd_kept(conn: Connection) -> tuple[int, int, int]:
    return tuple(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                 for table in ("mailboxes", "mailbox_grants", "mailapi_mail"))  # type: ignore[return-value]


def thd_columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("mailboxes")}


def thd_index_names(conn: Connection) -> set[str | None]:
    return {i["name"] for i in inspect(conn).get_indexes("mailboxes")}


def thd_broken_references(conn: Connection) -> list[object]:
    if conn.dialect.name != "sqlite":
        return []
    return [row for table in ("mailboxes", "mailbox_grants", "mailapi_mail")
            for row in conn.exec_driver_sql(f"PRAGMA foreign_key_check({table})")]


class MailboxDomainsMigrationMixin(DatabaseMixin):
    async def at_0034(self) -> tuple[Database, dict[str, int]]:
        db = await self.open_database_before(BEFORE)
        self.assertNotIn("domain_id", await db.read("columns", thd_columns))
        return db, await db.run("world", thd_world)

    async def test_each_mailbox_is_bound_to_the_domain_row_it_was_made_under(self) -> None:
        db, ids = await self.at_0034()
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("bindings", thd_bindings), {
            "bob@x.test": ids["x.test"], "old@y.test": None, "gone@z.test": None})
        self.assertEqual(await db.read("kept", thd_kept), (3, 1, 1))
        self.assertEqual(await db.read("broken", thd_broken_references), [])
        self.assertIn("ix_mailboxes_domain_id", await db.read("ix", thd_index_names))
        # Only the bound mailbox is routed to: carol's y.test does not take alice's old@.
        self.assertEqual(await db.read("hosted", thd_hosted), frozenset({"bob@x.test"}))
        # Removing the domain unbinds its mailbox (ON DELETE SET NULL) and keeps it.
        await db.run("remove", lambda c: c.execute(
            text("DELETE FROM domains WHERE id = :d"), {"d": ids["x.test"]}))
        self.assertEqual((await db.read("bindings", thd_bindings))["bob@x.test"], None)
        self.assertEqual(await db.read("kept", thd_kept), (3, 1, 1))

    async def test_the_way_down_keeps_the_mailboxes_their_grants_and_mail(self) -> None:
        db, _ = await self.at_0034()
        await threads.deferToThread(db.migrate_blocking)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("domain_id", await db.read("columns", thd_columns))
        self.assertEqual(await db.read("kept", thd_kept), (3, 1, 1))
        self.assertEqual(await db.read("broken", thd_broken_references), [])
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("kept", thd_kept), (3, 1, 1))


class SQLiteMailboxDomainsMigrationTests(MailboxDomainsMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresMailboxDomainsMigrationTests(MailboxDomainsMigrationMixin, TestCase):
    backend = "postgresql"
