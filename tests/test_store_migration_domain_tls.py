"""Migration 0008: a domain's `require_tls` flag becomes its TLS policy "verify", and back.

Each test runs on SQLite and on PostgreSQL, on rows written at revision 0007 (the flag)
and at head (the policy), so the data survives the way up and the way down.
"""

from __future__ import annotations

import datetime
from typing import Any

from sqlalchemy import Connection, insert, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import current_revision, downgrade_to, head_revision
from mailcore.store.schema import users
from tests.support.db import DatabaseMixin

BEFORE = "0007_quarantine"  # the revision 0008_domain_tls builds on


def thd_add_owner(conn: Connection) -> int:
    """Blocking: a user to own the test domains (the users table is the same at both ends)."""
    now = datetime.datetime.now(datetime.UTC)
    return int(conn.execute(
        insert(users).values(username="owner", email="owner@example.test", nic="N1",
                             created_at=now).returning(users.c.id)
    ).scalar_one())


def thd_add_flagged_domain(conn: Connection, owner: int, name: str, required: bool) -> None:
    """Blocking: a domain row as revision 0007 stored it (require_tls, no policy)."""
    conn.execute(
        text("INSERT INTO domains (owner_id, name, redirect_host, redirect_port, require_tls,"
             " spam_action, virus_action, send_resume, created_at)"
             " VALUES (:owner, :name, 'mx.test', 25, :required, 0, 0, :no, :now)"),
        {"owner": owner, "name": name, "required": required, "no": False,
         "now": datetime.datetime.now(datetime.UTC)},
    )


def thd_add_domain_with_policy(
    conn: Connection, owner: int, name: str, policy: str | None
) -> None:
    """Blocking: a domain row as revision 0008 stores it (a TLS policy, no flag)."""
    conn.execute(
        text("INSERT INTO domains (owner_id, name, redirect_host, created_at, tls)"
             " VALUES (:owner, :name, 'mx.test', :now, :policy)"),
        {"owner": owner, "name": name, "policy": policy,
         "now": datetime.datetime.now(datetime.UTC)},
    )


def thd_columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("domains")}


def thd_column(conn: Connection, column: str) -> dict[str, Any]:
    """Blocking: name → the value of `column`, for every domain."""
    rows = conn.execute(text(f"SELECT name, {column} FROM domains"))
    return {row[0]: row[1] for row in rows}


class DomainTLSMigrationMixin(DatabaseMixin):
    async def at_0007(self) -> Database:
        return await self.open_database_before(BEFORE)

    async def test_a_new_database_has_the_policy_column_only(self) -> None:
        db = await self.open_database()
        self.assertEqual(await threads.deferToThread(current_revision, db.engine),
                         head_revision())
        columns = await db.read("columns", thd_columns)
        self.assertIn("tls", columns)
        self.assertNotIn("require_tls", columns)

    async def test_require_tls_becomes_the_verify_policy(self) -> None:
        db = await self.at_0007()
        owner = await db.run("owner", thd_add_owner)
        await db.run("d", thd_add_flagged_domain, owner, "strict.test", True)
        await db.run("d", thd_add_flagged_domain, owner, "plain.test", False)
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("tls", thd_column, "tls"),
                         {"strict.test": "verify", "plain.test": None})
        self.assertNotIn("require_tls", await db.read("columns", thd_columns))

    async def test_downgrade_keeps_verify_as_require_tls(self) -> None:
        db = await self.open_database()
        owner = await db.run("owner", thd_add_owner)
        for name, policy in (("strict.test", "verify"), ("lax.test", "may"),
                             ("plain.test", None), ("none.test", "none")):
            await db.run("d", thd_add_domain_with_policy, owner, name, policy)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        flags = await db.read("flags", thd_column, "require_tls")
        self.assertEqual({name: bool(flag) for name, flag in flags.items()},
                         {"strict.test": True, "lax.test": False, "plain.test": False,
                          "none.test": False})
        self.assertNotIn("tls", await db.read("columns", thd_columns))
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("tls", thd_column, "tls"),
                         {"strict.test": "verify", "lax.test": None, "plain.test": None,
                          "none.test": None})


class SQLiteDomainTLSMigrationTests(DomainTLSMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresDomainTLSMigrationTests(DomainTLSMigrationMixin, TestCase):
    backend = "postgresql"
