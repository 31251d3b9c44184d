"""Migration 0034: a removed domain's id is never given to another domain; rows survive.

On SQLite the table is rebuilt with AUTOINCREMENT, and its sequence starts above every
domain id a queued recipient or the change log still names; PostgreSQL's sequence already
never gives an id twice. Both backends: the next domain added after the migration gets an
id no row named before.
"""

from __future__ import annotations

import datetime

from sqlalchemy import Connection, insert, select, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from mailcore.store.schema import domain_addresses, domains, users
from tests.support.db import DatabaseMixin

BEFORE = "0033_drop_open_receipts"  # the revision 0034_domain_ids_never_reused builds on
NOW = datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC)


def thd_add_domain(conn: Connection, owner: int, name: str) -> int:
    """Blocking: a domain row (the columns are the same at both ends)."""
    return int(conn.execute(
        insert(domains).values(owner_id=owner, name=name, redirect_host="mx.example.net",
                               created_at=NOW).returning(domains.c.id)
    ).scalar_one())


def thd_setup(conn: Connection) -> tuple[int, int]:
    """Blocking, at 0033: two domains (the second with an address) and a queued recipient
    of a third, removed domain; the newest domain is then removed. (kept id, removed id)"""
    owner = int(conn.execute(
        insert(users).values(username="alice", email="alice@example.test", nic="N1",
                             created_at=NOW).returning(users.c.id)
    ).scalar_one())
    kept = thd_add_domain(conn, owner, "kept.test")
    conn.execute(insert(domain_addresses).values(domain_id=kept, local_part="john"))
    gone = thd_add_domain(conn, owner, "gone.test")
    conn.execute(text(
        "INSERT INTO queue_messages (id, mail_from, kind, size, created_at, body)"
        " VALUES ('Q1', 's@x.test', 'relay', 1, 0, :body)"), {"body": b"A"})
    conn.execute(text(
        "INSERT INTO queue_recipients (message_id, address, domain_id, state,"
        " next_attempt_at, updated_at) VALUES ('Q1', 'ceo@gone.test', :gone, 'deferred', 0, 0)"),
        {"gone": gone})
    conn.execute(text("DELETE FROM domains WHERE id = :gone"), {"gone": gone})
    return kept, gone


def thd_rows(conn: Connection) -> list[tuple[int, str, list[str]]]:
    return [
        (row.id, row.name, list(conn.execute(
            select(domain_addresses.c.local_part).where(domain_addresses.c.domain_id == row.id)
        ).scalars()))
        for row in conn.execute(select(domains.c.id, domains.c.name).order_by(domains.c.id))
    ]


class DomainIdMigrationMixin(DatabaseMixin):
    async def at_0033(self) -> tuple[Database, int, int]:
        db = await self.open_database_before(BEFORE)
        kept, gone = await db.run("setup", thd_setup)
        return db, kept, gone

    async def test_a_removed_domains_id_is_not_given_again(self) -> None:
        db, kept, gone = await self.at_0033()
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("rows", thd_rows), [(kept, "kept.test", ["john"])])
        owner = await db.read("owner", lambda c: c.execute(select(users.c.id)).scalar_one())
        added = await db.run("add", thd_add_domain, owner, "new.test")
        self.assertGreater(added, gone)

    async def test_rows_survive_the_way_down(self) -> None:
        db, kept, _ = await self.at_0033()
        await threads.deferToThread(db.migrate_blocking)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertEqual(await db.read("rows", thd_rows), [(kept, "kept.test", ["john"])])


class SQLiteDomainIdMigrationTests(DomainIdMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresDomainIdMigrationTests(DomainIdMigrationMixin, TestCase):
    backend = "postgresql"
    timeout = 240
