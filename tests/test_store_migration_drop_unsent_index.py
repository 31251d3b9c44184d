"""Migration 0067: `ix_drop_bundles_owner_unsent`, the index `[safedrop]
max_bundles_per_user` counts a user's unsent bundles through, comes on the way up and goes
on the way down, every bundle kept, on SQLite and on PostgreSQL; it is partial, of the
bundles not sent only."""

from __future__ import annotations

import datetime

import sqlalchemy as sa
from sqlalchemy import Connection, inspect
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.safedrop.store import unsent_bundles_txn
from mailcore.store.migrate import downgrade_to
from mailcore.store.schema.identity import users
from mailcore.store.schema.safedrop import drop_bundles
from tests.support.db import DatabaseMixin, engine_query_plans

BEFORE = "0066_credential_purge_indexes"  # the revision 0067_drop_unsent_index builds on
INDEX = "ix_drop_bundles_owner_unsent"
NOW = datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC)


def thd_owner_with_bundles(conn: Connection) -> int:
    """Blocking: a user with three bundles sent and two not."""
    owner = int(conn.execute(sa.insert(users).values(
        username="alice", email="alice@example.test", nic="N1", created_at=NOW,
    ).returning(users.c.id)).scalar_one())
    for sent_at in (NOW, NOW, None, NOW, None):
        conn.execute(sa.insert(drop_bundles).values(
            owner_id=owner, subject="s", message="", email_receipt_when=4, read_remove=False,
            allow_comments=False, require_token_auth=False, created_at=NOW, sent_at=sent_at))
    return owner


def thd_indexes(conn: Connection) -> set[str]:
    return {i["name"] or "" for i in inspect(conn).get_indexes("drop_bundles")}


def thd_index_definition(conn: Connection) -> str:
    """The index as the database keeps it: SQLite's CREATE INDEX in sqlite_master,
    PostgreSQL's pg_indexes.indexdef."""
    if conn.dialect.name == "sqlite":
        query = "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = :name"
    else:
        query = ("SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema() "
                 "AND indexname = :name")
    return str(conn.execute(sa.text(query), {"name": INDEX}).scalar_one())


class DropUnsentIndexMigrationMixin(DatabaseMixin):
    timeout = 120
    # How the backend's definition of the index ends: its column and its partial predicate
    # (an index of every bundle would be found by its name, and used by the count too).
    definition_ends: str

    async def test_the_index_serves_the_count_after_the_upgrade_and_goes_on_the_way_down(
            self) -> None:
        db = await self.open_database_before(BEFORE)
        owner = await db.run("owner", thd_owner_with_bundles)
        self.assertNotIn(INDEX, await db.read("indexes", thd_indexes))
        await threads.deferToThread(db.migrate_blocking)
        self.assertIn(INDEX, await db.read("indexes", thd_indexes))
        definition = await db.read("index definition", thd_index_definition)
        self.assertTrue(definition.endswith(self.definition_ends), definition)
        with engine_query_plans(db.engine) as plans:
            self.assertEqual(await db.read("unsent", unsent_bundles_txn, owner), 2)
        self.assertTrue([p for p in plans if INDEX in p], plans)
        await threads.deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertNotIn(INDEX, await db.read("indexes", thd_indexes))
        self.assertEqual(await db.read("unsent", unsent_bundles_txn, owner), 2)
        self.assertEqual(await db.read("all", lambda c: c.execute(
            sa.select(sa.func.count()).select_from(drop_bundles)).scalar_one()), 5)


class SQLiteDropUnsentIndexMigrationTests(DropUnsentIndexMigrationMixin, TestCase):
    backend = "sqlite"
    definition_ends = "(owner_id) WHERE sent_at IS NULL"


class PostgresDropUnsentIndexMigrationTests(DropUnsentIndexMigrationMixin, TestCase):
    backend = "postgresql"
    definition_ends = " USING btree (owner_id) WHERE (sent_at IS NULL)"
