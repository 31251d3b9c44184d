"""Migration 0056: a store stamped past migrations it never ran gets what they made; and a
store stamped with a retired revision id (RETIRED_REVISIONS) is upgraded.

Released commits stamped stores `0048_fetch_folder_skipped` with 0048 revising 0041 (no
0042, no 0046), and `0051_drop_secrets_removed` with 0051 revising 0048 (no 0049, no 0050);
the chain now runs those migrations before them, so Alembic never ran them on such a store
and the daemon failed on "no such column: users.deleting_at" or "mailboxes.used_bytes".
Each test builds the store as that commit left it (its migration's statements, its stamp,
rows as its code wrote them), upgrades it to head and reads what was missing, on SQLite
and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy import Connection, inspect, text
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.store.migrate import current_revision, head_revision
from tests.support.db import DatabaseMixin
from tests.support.fetchenv import thd_make_user


def thd_stamp(conn: Connection, revision: str) -> None:
    conn.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})


def thd_as_0048_on_0041(conn: Connection) -> None:
    """Blocking: what 0048_fetch_folder_skipped did when it revised 0041, and its stamp;
    a user as that code stored it (no deleting_at)."""
    conn.execute(text("ALTER TABLE fetch_folders ADD COLUMN skipped_uids TEXT"))
    thd_stamp(conn, "0048_fetch_folder_skipped")
    conn.execute(text("INSERT INTO users (username, email, nic, created_at) VALUES "
                      "('Alice', 'Alice@example.test', 'MC-1', '2026-12-06 09:30:00+00')"))


def thd_as_0051_on_0048(conn: Connection) -> None:
    """Blocking: what 0051_drop_secrets_removed did when it revised 0048, and its stamp;
    a mailbox with a received mail and a draft with an attachment as that code stored
    them (no size, no used_bytes, no author)."""
    conn.execute(text("ALTER TABLE drop_bundles ADD COLUMN has_secure_message BOOLEAN "
                      "DEFAULT '0' NOT NULL"))
    thd_stamp(conn, "0051_drop_secrets_removed")
    owner = thd_make_user(conn, "bob")
    conn.execute(text("INSERT INTO mailboxes (address, owner_id, created_at, mail_count) "
                      "VALUES ('bob@hosted.test', :o, 1.0, 2)"), {"o": owner})
    box = conn.execute(text("SELECT id FROM mailboxes")).scalar_one()
    conn.execute(text(
        "INSERT INTO mailapi_mail (public_id, mailbox_id, status, subject, body, created_at) "
        "VALUES ('a1', :b, 'inbox', 'Grüße', 'Hallo', 1.0), "
        "('a2', :b, 'draft', 'x', '', 2.0)"), {"b": box})
    draft = conn.execute(text("SELECT id FROM mailapi_mail WHERE public_id = 'a2'")).scalar()
    conn.execute(text(
        "INSERT INTO mailapi_attachments (mail_id, name, content_type, size, sha256) "
        "VALUES (:m, 'a.pdf', 'application/pdf', 1000, :h)"), {"m": draft, "h": "0" * 64})


def thd_as_0054_file_nodes(conn: Connection, rate_buckets: bool) -> None:
    """Blocking: what 0054_file_nodes (fbaca15: its file_nodes table) or
    0054_file_nodes_rate_buckets (cd928b7: both tables, as 0052 makes them) did on 0051,
    and its stamp; a user as that code stored it."""
    metadata = sa.MetaData()
    sa.Table("file_nodes", metadata,
             sa.Column("node_id", sa.String(255), primary_key=True),
             sa.Column("marker", sa.String(64), nullable=False),
             sa.Column("seen_at", sa.Float(), nullable=False))
    if rate_buckets:
        sa.Index("ix_rate_buckets_full_at", sa.Table(
            "rate_buckets", metadata,
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("tokens", sa.Float(), nullable=False),
            sa.Column("at", sa.Float(), nullable=False),
            sa.Column("full_at", sa.Float(), nullable=False)).c.full_at)
    metadata.create_all(conn)
    thd_stamp(conn, "0054_file_nodes_rate_buckets" if rate_buckets else "0054_file_nodes")
    thd_make_user(conn, "alice")


def thd_as_0021_reserved(conn: Connection) -> None:
    """Blocking: a store fe67b6a migrated: 0017-0021 were reserved, empty (it stamped 0021
    over 0016's schema); a user and a mailbox with two mails as that code stored them."""
    thd_stamp(conn, "0021_fetch_bulk")
    owner = thd_make_user(conn, "bob")
    conn.execute(text("INSERT INTO mailboxes (address, owner_id, created_at) "
                      "VALUES ('bob@hosted.test', :o, 1.0)"), {"o": owner})
    box = conn.execute(text("SELECT id FROM mailboxes")).scalar_one()
    conn.execute(text(
        "INSERT INTO mailapi_mail (public_id, mailbox_id, status, subject, raw, created_at) "
        "VALUES ('a1', :b, 'inbox', 'Grüße', :raw, 1.0), ('a2', :b, 'draft', 'x', NULL, 2.0)"),
        {"b": box, "raw": b"Subject: x\r\n\r\nhi\r\n"})


def thd_as_0021_before_completion(conn: Connection) -> None:
    """Blocking: a store the commits between 0018's and 0019's first version and their
    completion (7608f97, 869030d) migrated: no mailbox_jobs.tls_ca_pem/tls_fingerprint, no
    mailboxes.mail_count; a mailbox with a mail."""
    for table, column in (("mailbox_jobs", "tls_ca_pem"), ("mailbox_jobs", "tls_fingerprint"),
                          ("mailboxes", "mail_count")):
        conn.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
    owner = thd_make_user(conn, "bob")
    conn.execute(text("INSERT INTO mailboxes (address, owner_id, created_at) "
                      "VALUES ('bob@hosted.test', :o, 1.0)"), {"o": owner})
    box = conn.execute(text("SELECT id FROM mailboxes")).scalar_one()
    conn.execute(text("INSERT INTO mailapi_mail (public_id, mailbox_id, status, created_at) "
                      "VALUES ('a1', :b, 'inbox', 1.0)"), {"b": box})


def thd_domain_generation(conn: Connection, stamp: str | None) -> None:
    """Blocking: what 0010_domain_generation made (0f7cfb3) in place of change_counters,
    and, with `stamp`, that commit's stamp; a user as that code stored it."""
    conn.execute(text("DROP TABLE change_counters"))
    conn.execute(text("CREATE TABLE domain_generation (id INTEGER NOT NULL, "
                      "generation BIGINT NOT NULL, CONSTRAINT pk_domain_generation "
                      "PRIMARY KEY (id))"))
    conn.execute(text("INSERT INTO domain_generation (id, generation) VALUES (1, 7)"))
    if stamp is not None:
        thd_stamp(conn, stamp)
    thd_make_user(conn, "alice")


def thd_as_0065_token_usage_day(conn: Connection) -> None:
    """Blocking: what 0065_token_usage_day (09a378d: ix_token_usage_day alone) did on
    0064, and its stamp; a user as that code stored it."""
    conn.execute(text("CREATE INDEX ix_token_usage_day ON token_usage (day)"))
    thd_stamp(conn, "0065_token_usage_day")
    thd_make_user(conn, "alice")


def thd_indexes(conn: Connection, table: str) -> set[str]:
    """The names of `table`'s indexes, those on an expression included (which SQLAlchemy's
    inspector leaves out on SQLite)."""
    if conn.dialect.name == "sqlite":
        query = ("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = :t "
                 "AND name NOT LIKE 'sqlite_autoindex%'")
    else:
        query = "SELECT indexname FROM pg_indexes WHERE tablename = :t AND indexname LIKE 'ix_%'"
    return set(conn.execute(text(query), {"t": table}).scalars())


def thd_columns(conn: Connection, table: str) -> set[str]:
    return {c["name"] for c in inspect(conn).get_columns(table)}


class SchemaRepairMigrationMixin(DatabaseMixin):
    timeout = 120

    async def upgraded(self, before: str, build: Callable[[Connection], None]) -> Database:
        """A store at `before` that the commit `build` stands for took further, upgraded."""
        db = await self.open_database_before(before)
        await db.run("old", build)
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await threads.deferToThread(current_revision, db.engine),
                         head_revision())
        return db

    async def test_a_store_stamped_0048_on_0041_gets_0042_and_0046(self) -> None:
        db = await self.upgraded("0041_quarantine_email_key", thd_as_0048_on_0041)
        self.assertIn("deleting_at", await db.read("c", thd_columns, "users"))
        self.assertIn("started_at", await db.read("c", thd_columns, "quarantine_digest_runs"))
        rows = await db.read("users", lambda c: c.execute(
            text("SELECT username, deleting_at FROM users")).all())
        self.assertEqual([tuple(r) for r in rows], [("Alice", None)])

    async def test_a_store_stamped_0051_on_0048_gets_0049_and_0050(self) -> None:
        db = await self.upgraded("0048_fetch_folder_skipped", thd_as_0051_on_0048)
        self.assertLessEqual({"size", "author_id"},
                             await db.read("c", thd_columns, "mailapi_mail"))
        sizes = await db.read("sizes", lambda c: c.execute(text(
            "SELECT public_id, size, author_id FROM mailapi_mail ORDER BY public_id")).all())
        # "Grüße" is 7 bytes in UTF-8, "Hallo" 5; the draft's "x" and its attachment.
        self.assertEqual([tuple(r) for r in sizes], [("a1", 12, None), ("a2", 1001, None)])
        used = await db.read("used", lambda c: c.execute(
            text("SELECT used_bytes FROM mailboxes")).scalar())
        self.assertEqual(used, 1013)
        indexes = await db.read("i", lambda c: {
            i["name"] for i in inspect(c).get_indexes("mailapi_mail")})
        self.assertIn("ix_mailapi_mail_author_id", indexes)

    async def test_a_store_stamped_0021_over_reserved_migrations_gets_0017_to_0020(self) -> None:
        # Head's daemon failed at its start: "no such table: mailbox_jobs".
        db = await self.upgraded("0016_job_leases", thd_as_0021_reserved)
        self.assertIn("meta_data", await db.read("c", thd_columns, "message_attachments"))
        self.assertIn("tls_ca_pem", await db.read("c", thd_columns, "mailbox_jobs"))
        self.assertIn("raw_sha256", await db.read("c", thd_columns, "mailapi_mail"))
        self.assertIn("total", await db.read("c", thd_columns, "message_counts"))
        self.assertEqual(await db.read("n", lambda c: c.execute(
            text("SELECT mail_count FROM mailboxes")).scalar()), 2)
        # 0049 counted the message kept in `raw` (18 bytes) and the subjects (7 + 1).
        self.assertEqual(await db.read("n", lambda c: c.execute(
            text("SELECT used_bytes FROM mailboxes")).scalar()), 26)

    async def test_a_store_of_0018_and_0019_before_completion_gets_their_columns(self) -> None:
        db = await self.upgraded("0021_fetch_bulk", thd_as_0021_before_completion)
        self.assertLessEqual({"tls_ca_pem", "tls_fingerprint"},
                             await db.read("c", thd_columns, "mailbox_jobs"))
        self.assertEqual(await db.read("n", lambda c: c.execute(
            text("SELECT mail_count FROM mailboxes")).scalar()), 1)

    async def test_a_store_stamped_0010_domain_generation_is_upgraded(self) -> None:
        # Refused before: "the database schema is at revision 0010_domain_generation,
        # newer than this version of Mailcore knows".
        db = await self.upgraded("0010_change_counters",
                                 lambda c: thd_domain_generation(c, "0010_domain_generation"))
        await self.assert_counters_replace_domain_generation(db)

    async def test_a_store_of_0011_on_0010_domain_generation_is_upgraded(self) -> None:
        # 8aee59a stamped 0011 over 0010_domain_generation; 0029 failed on it before:
        # "no such table: change_counters", and the daemon never started.
        db = await self.upgraded("0011_domain_verification",
                                 lambda c: thd_domain_generation(c, None))
        await self.assert_counters_replace_domain_generation(db)

    async def assert_counters_replace_domain_generation(self, db: Database) -> None:
        self.assertFalse(await db.read("t", lambda c: inspect(c).has_table("domain_generation")))
        names = await db.read("n", lambda c: set(c.execute(
            text("SELECT name FROM change_counters")).scalars()))
        self.assertLessEqual({"domains", "queue_flush"}, names)
        self.assertEqual(await db.read("u", lambda c: c.execute(
            text("SELECT username FROM users")).scalar()), "alice")

    async def test_a_store_stamped_0054_file_nodes_is_upgraded(self) -> None:
        # Refused before: "the database schema is at revision 0054_file_nodes, newer than
        # this version of Mailcore knows", and no version knew it.
        db = await self.upgraded("0051_drop_secrets_removed",
                                 lambda c: thd_as_0054_file_nodes(c, rate_buckets=False))
        self.assertIn("full_at", await db.read("c", thd_columns, "rate_buckets"))
        self.assertIn("files_marker", await db.read("c", thd_columns, "nodes"))
        self.assertEqual(await db.read("u", lambda c: c.execute(
            text("SELECT username FROM users")).scalar()), "alice")

    async def test_a_store_stamped_0054_file_nodes_rate_buckets_is_upgraded(self) -> None:
        db = await self.upgraded("0051_drop_secrets_removed",
                                 lambda c: thd_as_0054_file_nodes(c, rate_buckets=True))
        self.assertIn("full_at", await db.read("c", thd_columns, "rate_buckets"))
        self.assertFalse(await db.read("t", lambda c: inspect(c).has_table("file_nodes")))

    async def test_a_store_stamped_0065_token_usage_day_is_upgraded(self) -> None:
        # Refused before: "the database schema is at revision 0065_token_usage_day, newer
        # than this version of Mailcore knows" (112ff7a renamed it and added an index).
        db = await self.upgraded("0064_webhook_prune_index", thd_as_0065_token_usage_day)
        self.assertIn("ix_token_usage_day", await db.read("i", thd_indexes, "token_usage"))
        self.assertIn("ix_messages_account_created",
                      await db.read("i", thd_indexes, "messages"))
        self.assertLessEqual({"ix_credentials_expires_at", "ix_credentials_login_idle"},
                             await db.read("i", thd_indexes, "credentials"))
        self.assertEqual(await db.read("u", lambda c: c.execute(
            text("SELECT username FROM users")).scalar()), "alice")
        fresh = await self.open_database()
        for table in ("token_usage", "messages", "credentials"):
            self.assertEqual(await db.read("i", thd_indexes, table),
                             await fresh.read("i", thd_indexes, table))

    async def test_a_store_that_ran_every_migration_is_left_as_it_is(self) -> None:
        db = await self.open_database()
        before = await db.read("c", thd_columns, "mailapi_mail")
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("c", thd_columns, "mailapi_mail"), before)


class SQLiteSchemaRepairMigrationTests(SchemaRepairMigrationMixin, TestCase):
    backend = "sqlite"


class PostgresSchemaRepairMigrationTests(SchemaRepairMigrationMixin, TestCase):
    backend = "postgresql"
