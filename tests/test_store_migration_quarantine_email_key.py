"""Migration 0041: `quarantine.email_key`, the key a listing by address compares.

The rows held at 0040 get the key of their recipient (its local part, trimmed, NFC, lower
case), across more than one batch of the backfill; the column and its index go on the way
down and every row survives both ways, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import datetime

from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.gateway.quarantine import address_key
from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from tests.support.db import DatabaseMixin
from tests.support.mailsink import add_domain

BEFORE = "0040_users_lower_unique"  # the revision 0041_quarantine_email_key builds on
NOW = datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC)
SPELLINGS = ("\u00dcnal@xn--bcher-kva.test", "U\u0308NAL@b\u00fccher.test", "Joe@q.test",
             "plain@q.test", " x@q.test")
ROWS = 1005  # more than one batch (1,000) of the backfill


def thd_add_rows(conn: Connection, domain_id: int) -> None:
    """Blocking: quarantine rows as revision 0040 stores them (no email_key)."""
    owner = conn.execute(text("SELECT owner_id FROM domains WHERE id = :d"),
                         {"d": domain_id}).scalar_one()
    conn.execute(
        text("INSERT INTO quarantine (ident, owner_id, domain_id, domain, email, mailfrom,"
             " subject, category, reason, queue_id, body, size, created_at) VALUES (:ident,"
             " :owner, :domain_id, 'q.test', :email, 's@x.test', 's', 'spam', 'r', :q, :body,"
             " 1, :now)"),
        [{"ident": f"{n:020d}", "owner": owner, "domain_id": domain_id,
          "email": SPELLINGS[n % len(SPELLINGS)], "q": f"Q{n}", "body": b"x", "now": NOW}
         for n in range(ROWS)],
    )


def thd_keys(conn: Connection) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in conn.execute(
        text("SELECT email, email_key FROM quarantine ORDER BY id"))]


def thd_columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("quarantine")}


def thd_indexes(conn: Connection) -> set[str]:
    return {str(i["name"]) for i in inspect(conn).get_indexes("quarantine")}


class QuarantineEmailKeyMigrationMixin(DatabaseMixin):
    timeout = 120

    async def at_0040_with_rows(self) -> Database:
        db = await self.open_database_before(BEFORE)
        domain_id = await add_domain(db, "q.test", "10.0.0.1", 25)
        await db.run("rows", thd_add_rows, domain_id)
        return db

    async def test_every_row_gets_its_key_on_the_way_up(self) -> None:
        db = await self.at_0040_with_rows()
        await threads.deferToThread(db.migrate_blocking)
        keys = await db.read("keys", thd_keys)
        self.assertEqual(len(keys), ROWS)
        self.assertEqual({key for _, key in keys}, {"\u00fcnal", "joe", "plain", "x"})
        self.assertTrue(all(key == address_key(email) for email, key in keys))
        self.assertIn("ix_quarantine_domain_email_key", await db.read("ix", thd_indexes))

    async def test_the_column_goes_on_the_way_down(self) -> None:
        db = await self.at_0040_with_rows()
        await threads.deferToThread(db.migrate_blocking)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("email_key", await db.read("columns", thd_columns))
        self.assertNotIn("ix_quarantine_domain_email_key", await db.read("ix", thd_indexes))
        self.assertEqual(len(await db.read("rows", lambda c: c.execute(
            text("SELECT id FROM quarantine")).all())), ROWS)


class SQLiteQuarantineEmailKeyMigrationTests(QuarantineEmailKeyMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresQuarantineEmailKeyMigrationTests(QuarantineEmailKeyMigrationMixin, TestCase):
    backend = "postgresql"
