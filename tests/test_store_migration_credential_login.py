"""Migration 0039: `credentials.login` marks the tokens password logins handed out.

The tokens written at 0034 with a login's label are marked, every other row is not, and
every row survives both ways, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import datetime

from sqlalchemy import Connection, insert, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from mailcore.store.schema import users
from tests.support.db import DatabaseMixin

BEFORE = "0038_quarantine_queue_index"  # the revision 0039_credential_login builds on
NOW = datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC)
ROWS = (("token", "api-token-auth"), ("token", "mailapi-auth"), ("token", "ci"),
        ("apikey", "api-token-auth"), ("page", ""), ("session", ""))


def thd_add_user(conn: Connection) -> int:
    return int(conn.execute(
        insert(users).values(username="alice", email="alice@example.test", nic="N1",
                             created_at=NOW).returning(users.c.id)
    ).scalar_one())


def thd_add_credential(conn: Connection, user_id: int, n: int, kind: str, label: str) -> None:
    """Blocking: a credential row as revision 0034 stores it."""
    conn.execute(
        text("INSERT INTO credentials (user_id, kind, prefix, digest, label, created_at)"
             " VALUES (:user, :kind, :prefix, :digest, :label, :now)"),
        {"user": user_id, "kind": kind, "prefix": f"{n:08x}", "digest": bytes([n]) * 32,
         "label": label, "now": NOW},
    )


def thd_rows(conn: Connection) -> list[tuple[str, str, bool]]:
    rows = conn.execute(text("SELECT kind, label, login FROM credentials ORDER BY id"))
    return [(row[0], row[1], bool(row[2])) for row in rows]


def thd_columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("credentials")}


class CredentialLoginMigrationMixin(DatabaseMixin):
    async def at_0034_with_credentials(self) -> Database:
        db = await self.open_database_before(BEFORE)
        user = await db.run("user", thd_add_user)
        for n, (kind, label) in enumerate(ROWS, 1):
            await db.run("credential", thd_add_credential, user, n, kind, label)
        return db

    async def test_the_login_tokens_are_marked_on_the_way_up(self) -> None:
        db = await self.at_0034_with_credentials()
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("rows", thd_rows), [
            ("token", "api-token-auth", True), ("token", "mailapi-auth", True),
            ("token", "ci", False), ("apikey", "api-token-auth", False), ("page", "", False),
            ("session", "", False)])

    async def test_the_column_goes_on_the_way_down(self) -> None:
        db = await self.at_0034_with_credentials()
        await threads.deferToThread(db.migrate_blocking)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("login", await db.read("columns", thd_columns))
        self.assertEqual(len(await db.read("rows", lambda c: c.execute(
            text("SELECT id FROM credentials")).all())), len(ROWS))


class SQLiteCredentialLoginMigrationTests(CredentialLoginMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresCredentialLoginMigrationTests(CredentialLoginMigrationMixin, TestCase):
    backend = "postgresql"
