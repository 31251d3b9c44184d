"""Migration 0009: `credentials.parent_id` links a session to its API key; rows survive.

On SQLite the column and its foreign key come by rebuilding the table, so the tests check
that every credential written at 0008 is still there afterwards (and after the way down),
on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import datetime

from sqlalchemy import Connection, insert, inspect, select, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from mailcore.store.schema import users
from tests.support.db import DatabaseMixin

BEFORE = "0008_domain_tls"  # the revision 0009_credential_parent builds on
NOW = datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC)


def thd_add_user(conn: Connection) -> int:
    """Blocking: a user (the users table is the same at both ends)."""
    return int(conn.execute(
        insert(users).values(username="alice", email="alice@example.test", nic="N1",
                             created_at=NOW).returning(users.c.id)
    ).scalar_one())


def thd_add_credential(conn: Connection, user_id: int, kind: str, prefix: str) -> None:
    """Blocking: a credential row as revision 0008 stores it (no parent)."""
    conn.execute(
        text("INSERT INTO credentials (user_id, kind, prefix, digest, created_at)"
             " VALUES (:user, :kind, :prefix, :digest, :now)"),
        {"user": user_id, "kind": kind, "prefix": prefix, "digest": prefix.encode() * 4,
         "now": NOW},
    )


def thd_credentials(conn: Connection) -> list[tuple[str, str]]:
    rows = conn.execute(text("SELECT kind, prefix FROM credentials ORDER BY id"))
    return [(row[0], row[1]) for row in rows]


def thd_columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("credentials")}


def thd_index_names(conn: Connection) -> set[str | None]:
    return {i["name"] for i in inspect(conn).get_indexes("credentials")}


def thd_parent_ids(conn: Connection) -> list[int | None]:
    return list(conn.execute(text("SELECT parent_id FROM credentials ORDER BY id")).scalars())


class CredentialParentMigrationMixin(DatabaseMixin):
    async def at_0008_with_credentials(self) -> Database:
        db = await self.open_database_before(BEFORE)
        user = await db.run("user", thd_add_user)
        for kind, prefix in (("apikey", "aaaa1111"), ("session", "bbbb2222"),
                             ("token", "cccc3333")):
            await db.run("credential", thd_add_credential, user, kind, prefix)
        return db

    async def test_credentials_survive_the_way_up_with_no_parent(self) -> None:
        db = await self.at_0008_with_credentials()
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("rows", thd_credentials),
                         [("apikey", "aaaa1111"), ("session", "bbbb2222"),
                          ("token", "cccc3333")])
        self.assertEqual(await db.read("parents", thd_parent_ids), [None, None, None])
        self.assertTrue({"ix_credentials_prefix", "ix_credentials_user_kind",
                         "ix_credentials_parent_id"} <= await db.read("ix", thd_index_names))

    async def test_credentials_survive_the_way_down(self) -> None:
        db = await self.at_0008_with_credentials()
        await threads.deferToThread(db.migrate_blocking)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("parent_id", await db.read("columns", thd_columns))
        self.assertEqual(len(await db.read("rows", thd_credentials)), 3)
        self.assertTrue({"ix_credentials_prefix", "ix_credentials_user_kind"}
                        <= await db.read("ix", thd_index_names))
        # The users table was not touched by the rebuild.
        self.assertEqual(len(await db.read("users", lambda c: c.execute(
            select(users.c.id)).all())), 1)


class SQLiteCredentialParentMigrationTests(CredentialParentMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresCredentialParentMigrationTests(CredentialParentMigrationMixin, TestCase):
    backend = "postgresql"
