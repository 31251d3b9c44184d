"""Migration 0042: `users.deleting_at`, the mark of a user `mailcore user delete` began to
delete. The users held at 0041 are there after it, none marked; the column goes on the way
down and every user survives both ways, on SQLite and on PostgreSQL."""

from __future__ import annotations

from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from tests.support.db import DatabaseMixin

BEFORE = "0041_quarantine_email_key"  # the revision 0042_user_deleting builds on


def thd_add_users(conn: Connection) -> None:
    """Blocking: users as revision 0041 stores them (no deleting_at)."""
    conn.execute(
        text("INSERT INTO users (username, email, nic, created_at) VALUES "
             "(:name, :email, 'MC-1', '2026-01-01 00:00:00+00')"),
        [{"name": f"u{n}", "email": f"u{n}@example.test"} for n in range(3)],
    )


def thd_columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("users")}


class UserDeletingMigrationMixin(DatabaseMixin):
    timeout = 120

    async def at_0041_with_users(self) -> Database:
        db = await self.open_database_before(BEFORE)
        self.assertNotIn("deleting_at", await db.read("columns", thd_columns))
        await db.run("users", thd_add_users)
        return db

    async def test_every_user_stays_unmarked_on_the_way_up(self) -> None:
        db = await self.at_0041_with_users()
        await threads.deferToThread(db.migrate_blocking)
        rows = await db.read("users", lambda c: c.execute(
            text("SELECT username, deleting_at FROM users ORDER BY id")).all())
        self.assertEqual([tuple(r) for r in rows], [("u0", None), ("u1", None), ("u2", None)])

    async def test_the_column_goes_on_the_way_down(self) -> None:
        db = await self.at_0041_with_users()
        await threads.deferToThread(db.migrate_blocking)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("deleting_at", await db.read("columns", thd_columns))
        self.assertEqual(len(await db.read("rows", lambda c: c.execute(
            text("SELECT id FROM users")).all())), 3)


class SQLiteUserDeletingMigrationTests(UserDeletingMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresUserDeletingMigrationTests(UserDeletingMigrationMixin, TestCase):
    backend = "postgresql"
