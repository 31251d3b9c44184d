"""Migration 0040: usernames and e-mails are unique in lower case, enforced by the store.

Both backends: after the migration a user whose name or address differs from another's only
in case cannot be stored; a store already holding such users is refused with a one-line
message naming them, and keeps them all; the way down takes the indexes away.
"""

from __future__ import annotations

import datetime

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import current_revision, downgrade_to
from mailcore.store.schema import users
from tests.support.db import DatabaseMixin

BEFORE = "0039_credential_login"  # the revision 0040_users_lower_unique builds on
NOW = datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC)


def thd_add_user(conn: Connection, username: str, email: str) -> int:
    return int(conn.execute(
        insert(users).values(username=username, email=email, nic="N", created_at=NOW)
        .returning(users.c.id)
    ).scalar_one())


def thd_names(conn: Connection) -> list[tuple[str, str]]:
    return [(r.username, r.email) for r in conn.execute(
        select(users.c.username, users.c.email).order_by(users.c.id))]


class UsersLowerMigrationMixin(DatabaseMixin):
    async def at_0039(self) -> Database:
        return await self.open_database_before(BEFORE)

    async def test_a_name_or_address_in_another_case_is_refused_after(self) -> None:
        db = await self.at_0039()
        await db.run("add", thd_add_user, "alice", "Alice@example.test")
        await threads.deferToThread(db.migrate_blocking)
        for name, email in (("ALICE", "other@example.test"), ("bob", "alice@EXAMPLE.test")):
            with self.assertRaises(IntegrityError):
                await db.run("add", thd_add_user, name, email)
        await db.run("add", thd_add_user, "bob", "bob@example.test")
        self.assertEqual(await db.read("names", thd_names),
                         [("alice", "Alice@example.test"), ("bob", "bob@example.test")])

    async def test_existing_duplicates_fail_the_migration_and_stay(self) -> None:
        db = await self.at_0039()
        alice = await db.run("add", thd_add_user, "alice", "a@example.test")
        big = await db.run("add", thd_add_user, "Alice", "b@example.test")
        await db.run("add", thd_add_user, "carol", "c@example.test")
        dave = await db.run("add", thd_add_user, "dave", "D@example.test")
        await db.run("add", thd_add_user, "eve", "e@example.test")
        other = await db.run("add", thd_add_user, "dave2", "d@example.test")
        with self.assertRaises(RuntimeError) as caught:
            await threads.deferToThread(db.migrate_blocking)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertIn(f"username 'alice' (user {alice}) = 'Alice' (user {big})", message)
        self.assertIn(f"email 'D@example.test' (user {dave}) = 'd@example.test' (user {other})",
                      message)
        self.assertNotIn("carol", message)
        self.assertEqual(await threads.deferToThread(current_revision, db.engine), BEFORE)
        self.assertEqual(len(await db.read("names", thd_names)), 6)

    async def test_the_way_down_drops_the_indexes(self) -> None:
        db = await self.at_0039()
        await threads.deferToThread(db.migrate_blocking)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        await db.run("add", thd_add_user, "alice", "a@example.test")
        await db.run("add", thd_add_user, "Alice", "A@example.test")
        self.assertEqual(len(await db.read("names", thd_names)), 2)


class SQLiteUsersLowerMigrationTests(UsersLowerMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresUsersLowerMigrationTests(UsersLowerMigrationMixin, TestCase):
    backend = "postgresql"
    timeout = 240
