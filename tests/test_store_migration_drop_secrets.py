"""Migration 0051: `drop_bundles.has_secure_message`, and the secrets of removed drops
cleared. Of the bundles held at 0048, those with a secure message are flagged so; a removed
one loses its secure message and password hash, a live one keeps them; the column goes on
the way down and every bundle survives both ways, on SQLite and on PostgreSQL."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import downgrade_to
from tests.support.db import DatabaseMixin

BEFORE = "0050_mailapi_mail_author"  # the revision 0051_drop_secrets_removed builds on


def thd_add_bundles(conn: Connection) -> None:
    """Blocking: a user and bundles as revision 0048 stores them: live with secrets,
    removed with secrets, live without."""
    conn.execute(text("INSERT INTO users (username, email, nic, created_at) VALUES "
                      "('u', 'u@example.test', 'MC-1', '2026-01-01 00:00:00+00')"))
    owner = conn.execute(text("SELECT id FROM users")).scalar_one()
    conn.execute(
        text("INSERT INTO drop_bundles (owner_id, subject, message, secure_message, "
             "password_hash, email_receipt_when, read_remove, allow_comments, "
             "require_token_auth, created_at, sent_at, removed_at) VALUES (:owner, :subject, "
             "'', :secure, :hash, 4, :t, :f, :f, '2026-01-01 00:00:00+00', "
             "'2026-01-01 00:00:00+00', :removed)"),
        [{"owner": owner, "subject": subject, "secure": secure, "hash": pw, "removed": removed,
          "t": True, "f": False}
         for subject, secure, pw, removed in (
             ("live", b"cipher-1", "$argon2id$1", None),
             ("removed", b"cipher-2", "$argon2id$2", "2026-01-02 00:00:00+00"),
             ("plain", None, None, None))],
    )


def thd_columns(conn: Connection) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns("drop_bundles")}


class DropSecretsMigrationMixin(DatabaseMixin):
    timeout = 120

    async def at_0048_with_bundles(self) -> Database:
        db = await self.open_database_before(BEFORE)
        self.assertNotIn("has_secure_message", await db.read("columns", thd_columns))
        await db.run("bundles", thd_add_bundles)
        return db

    async def rows(self, db: Database, columns: str) -> list[tuple[Any, ...]]:
        rows = await db.read("rows", lambda c: c.execute(
            text(f"SELECT {columns} FROM drop_bundles ORDER BY id")).all())
        return [tuple(r) for r in rows]

    async def test_flags_set_and_removed_drops_lose_their_secrets(self) -> None:
        db = await self.at_0048_with_bundles()
        await threads.deferToThread(db.migrate_blocking)
        rows = await self.rows(db, "subject, has_secure_message, secure_message, password_hash")
        self.assertEqual(
            [(s, bool(flag), bytes(m) if m is not None else None, h)
             for s, flag, m, h in rows],
            [("live", True, b"cipher-1", "$argon2id$1"),
             ("removed", True, None, None),
             ("plain", False, None, None)])

    async def test_the_column_goes_on_the_way_down(self) -> None:
        db = await self.at_0048_with_bundles()
        await threads.deferToThread(db.migrate_blocking)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn("has_secure_message", await db.read("columns", thd_columns))
        self.assertEqual(len(await self.rows(db, "id")), 3)


class SQLiteDropSecretsMigrationTests(DropSecretsMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresDropSecretsMigrationTests(DropSecretsMigrationMixin, TestCase):
    backend = "postgresql"
