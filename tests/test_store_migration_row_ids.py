"""Migration 0069: the id of a deleted message, thread, attachment, folder, Mail API mail,
safedrop bundle, recipient or file, user, queue recipient or webhook delivery is never given
to another row; rows, the full-text index, triggers and cascades survive.

On SQLite each table is rebuilt with AUTOINCREMENT, its sequence starting above every id a
row still names (a pending `email.new` event, a Mail API mail's delivered recipient);
PostgreSQL's sequences already never give an id twice. Both backends: a store at 0068
holding rows is migrated; then the newest row of each table is deleted and the next row
made gets an id above it (and above any id still named), the next after another delete
again; rows and ids, the full-text index, the triggers and the cascades are kept.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

from sqlalchemy import Connection, Table, delete, func, insert, select, text
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from mailcore.messages.sql import allocate_ids
from mailcore.store import Database
from mailcore.store.migrate import downgrade_to, upgrade_to
from mailcore.store.schema import (
    drop_bundles,
    drop_files,
    drop_recipients,
    fetch_accounts,
    fetch_folders,
    mailapi_mail,
    mailboxes,
    message_attachments,
    message_blobs,
    messages,
    queue_messages,
    queue_recipients,
    threads,
    users,
    webhook_deliveries,
    webhook_events,
    webhooks,
)
from mailcore.store.schema.messages import message_counts
from tests.support.db import DatabaseMixin

BEFORE = "0068_recipient_verdicts"  # the revision 0069_ids_never_reused builds on
REVISION = "0069_ids_never_reused"
NOW = datetime.datetime(2027, 1, 15, tzinfo=datetime.UTC)
SHA = "a" * 64


def _add(conn: Connection, table: Table, **values: object) -> int:
    return int(conn.execute(insert(table).values(**values).returning(table.c.id)).scalar_one())


# Blocking makers of one row of each table, given the ids of the rows it points at
# (`ids`: user, account, folder, thread, message, mailbox, mail, bundle, queue message,
# webhook). The columns are the same at 0068 and at 0069.
def _user(conn: Connection, ids: dict[str, int]) -> int:
    n = conn.execute(select(func.count()).select_from(users)).scalar_one()
    return _add(conn, users, username=f"u{n}-{ids.get('n', 0)}",
                email=f"u{n}-{ids.get('n', 0)}@example.test", nic="N", created_at=NOW)


def _message(conn: Connection, ids: dict[str, int], subject: str = "hello") -> int:
    return _add(conn, messages, user_id=ids["user"], account_id=ids["account"],
                folder_id=ids["folder"], thread_id=ids["thread"], sha256=SHA, size=5,
                subject=subject, created_at=NOW, updated_at=NOW)


MAKERS: dict[str, Callable[[Connection, dict[str, int]], int]] = {
    "users": _user,
    "fetch_folders": lambda c, ids: _add(c, fetch_folders, account_id=ids["account"],
                                         name=f"F{ids.get('n', 0)}"),
    "threads": lambda c, ids: _add(c, threads, user_id=ids["user"], created_at=NOW),
    "messages": _message,
    "message_attachments": lambda c, ids: _add(
        c, message_attachments, message_row_id=ids["message"], part_path="2",
        mime_type="text/plain", size=1),
    "mailapi_mail": lambda c, ids: _add(
        c, mailapi_mail, public_id=f"p{ids.get('n', 0)}", mailbox_id=ids["mailbox"],
        status="draft", created_at=0.0),
    "drop_bundles": lambda c, ids: _add(
        c, drop_bundles, owner_id=ids["user"], subject="s", message="m", email_receipt_when=0,
        read_remove=False, allow_comments=False, require_token_auth=False, created_at=NOW),
    "drop_recipients": lambda c, ids: _add(
        c, drop_recipients, bundle_id=ids["bundle"], email="r@example.test", telephone="",
        valid_for=1),
    "drop_files": lambda c, ids: _add(
        c, drop_files, bundle_id=ids["bundle"], name="f", content_type="text/plain", size=1,
        sha256=SHA, created_at=NOW),
    "queue_recipients": lambda c, ids: _add(
        c, queue_recipients, message_id="Q1", address="r@example.test", state="queued",
        next_attempt_at=0.0, updated_at=0.0),
    "webhook_deliveries": lambda c, ids: _add(
        c, webhook_deliveries, webhook_id=ids["webhook"], user_id=ids["user"],
        delivery_uuid="u", event="email.new", payload="{}", status="pending",
        next_attempt_at=0.0, created_at=0.0),
}


def thd_setup(conn: Connection) -> dict[str, int]:
    """Blocking, at 0068: a user with one row of each kind (`ids`), a message indexed under
    "zebracorn"; then in each table a newest row ("newest:TABLE"). An `email.new` event
    names a message id 5 past the newest, a mail's delivered recipient a recipient id 7
    past the newest ("named:TABLE"): rows deleted before the migration."""
    ids: dict[str, int] = {}
    ids["user"] = _user(conn, ids)
    conn.execute(insert(message_blobs).values(sha256=SHA, size=5, raw=b"hello",
                                              created_at=NOW))
    ids["account"] = _add(conn, fetch_accounts, user_id=ids["user"], host="h", port=993,
                          username="u", password_enc=b"x", created_at=NOW, updated_at=NOW)
    ids["folder"] = MAKERS["fetch_folders"](conn, ids)
    ids["thread"] = MAKERS["threads"](conn, ids)
    ids["message"] = _message(conn, ids, "zebracorn")
    ids["attachment"] = MAKERS["message_attachments"](conn, ids)
    ids["mailbox"] = _add(conn, mailboxes, address="box@example.test", owner_id=ids["user"],
                          created_at=0.0)
    ids["mail"] = MAKERS["mailapi_mail"](conn, ids)
    ids["bundle"] = MAKERS["drop_bundles"](conn, ids)
    ids["recipient"] = MAKERS["drop_recipients"](conn, ids)
    ids["file"] = MAKERS["drop_files"](conn, ids)
    conn.execute(insert(queue_messages).values(id="Q1", kind="in", mail_from="", size=1,
                                               created_at=0.0))
    ids["webhook"] = _add(conn, webhooks, user_id=ids["user"], url="https://h.example/in",
                          events="email.new", secret_enc=b"x", created_at=NOW,
                          updated_at=NOW)
    ids["n"] = 1
    for table, make in MAKERS.items():
        ids[f"newest:{table}"] = make(conn, ids)
    del ids["n"]
    ids["named:messages"] = ids["newest:messages"] + 5
    conn.execute(insert(webhook_events).values(
        user_id=ids["user"], account_id=ids["account"], event="email.new",
        ref_id=ids["named:messages"], created_at=0.0))
    ids["named:queue_recipients"] = ids["newest:queue_recipients"] + 7
    conn.execute(mailapi_mail.update().where(mailapi_mail.c.id == ids["mail"]).values(
        queue_rcpt_id=ids["named:queue_recipients"]))
    return ids


def thd_delete(conn: Connection, table: str, row_id: int) -> None:
    conn.execute(text(f"DELETE FROM {table} WHERE id = :id"), {"id": row_id})


def thd_ids(conn: Connection, table: Table) -> list[int]:
    return list(conn.execute(select(table.c.id).order_by(table.c.id)).scalars())


def thd_count(conn: Connection, table: Table) -> int:
    return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def thd_dependents(conn: Connection) -> dict[str, list[tuple[str, str, str]]]:
    """Blocking, SQLite: each table's indexes and triggers (type, name, SQL) in the order
    they were made."""
    found: dict[str, list[tuple[str, str, str]]] = {}
    for row in conn.execute(text(
            "SELECT tbl_name, type, name, sql FROM sqlite_master "
            "WHERE type IN ('index', 'trigger') ORDER BY rowid")):
        found.setdefault(row.tbl_name, []).append((row.type, row.name, row.sql))
    return found


def thd_search(conn: Connection, word: str) -> list[int]:
    """Blocking, SQLite: the messages the full-text index finds under `word`."""
    return list(conn.execute(text(
        "SELECT rowid FROM messages_fts WHERE messages_fts MATCH :w ORDER BY rowid"),
        {"w": word}).scalars())


class RowIdMigrationMixin(DatabaseMixin):
    async def at_0068_migrated(self) -> tuple[Database, dict[str, int]]:
        db = await self.open_database_before(BEFORE)
        ids = await db.run("setup", thd_setup)
        await deferToThread(db.migrate_blocking)
        return db, ids

    async def test_a_deleted_rows_id_is_not_given_again(self) -> None:
        db, ids = await self.at_0068_migrated()
        ids["n"] = 2
        for table, make in MAKERS.items():
            newest = ids[f"newest:{table}"]
            await db.run("delete", thd_delete, table, newest)
            made = await db.run("make", make, ids)
            self.assertGreater(made, newest, table)
            if self.backend == "sqlite" and f"named:{table}" in ids:
                # PostgreSQL's sequence is past the newest row only, and nothing named
                # an id beyond its sequence there.
                self.assertGreater(made, ids[f"named:{table}"], table)
            await db.run("delete", thd_delete, table, made)
            self.assertGreater(await db.run("make again", make, ids), made, table)

    async def test_the_message_stores_batches_take_no_deleted_id(self) -> None:
        """A sync writes its messages and threads with ids it allocates (allocate_ids: one
        multi-row INSERT a batch), not with the column's default: the id of a deleted newest
        row is not allocated again either."""
        db, ids = await self.at_0068_migrated()
        for table in (messages, threads):
            newest = ids[f"newest:{table.name}"]
            await db.run("delete", thd_delete, table.name, newest)
            given = await db.run("allocate", allocate_ids, table, 2)
            self.assertEqual(given, [given[0], given[0] + 1], table.name)
            self.assertGreater(given[0], newest, table.name)
            if self.backend == "sqlite" and f"named:{table.name}" in ids:
                self.assertGreater(given[0], ids[f"named:{table.name}"], table.name)

    async def test_rows_and_ids_are_kept(self) -> None:
        db, ids = await self.at_0068_migrated()
        kept = {
            users: ids["user"], fetch_folders: ids["folder"], threads: ids["thread"],
            messages: ids["message"], message_attachments: ids["attachment"],
            mailapi_mail: ids["mail"], drop_bundles: ids["bundle"],
            drop_recipients: ids["recipient"], drop_files: ids["file"],
        }
        for table, row_id in kept.items():
            self.assertEqual(await db.read("ids", thd_ids, table),
                             [row_id, ids[f"newest:{table.name}"]], table.name)
        self.assertEqual(await db.read("subject", lambda c: c.execute(
            select(messages.c.subject, messages.c.thread_id).where(
                messages.c.id == ids["message"])).one()),
            ("zebracorn", ids["thread"]))

    async def test_search_triggers_and_cascades_still_work(self) -> None:
        db, ids = await self.at_0068_migrated()
        if self.backend == "sqlite":
            self.assertEqual(await db.read("search", thd_search, "zebracorn"),
                             [ids["message"]])
        made = await db.run("message", _message, ids, "quokka")
        if self.backend == "sqlite":  # the full-text index's triggers are kept
            self.assertEqual(await db.read("search", thd_search, "quokka"), [made])
        total = await db.read("total", lambda c: c.execute(select(message_counts.c.total).where(
            message_counts.c.user_id == ids["user"])).scalar_one())
        self.assertEqual(total, 3)  # the counting triggers are kept
        await db.run("delete", lambda c: c.execute(delete(messages).where(
            messages.c.id == ids["message"])))
        self.assertEqual(await db.read("attachments", thd_count, message_attachments), 0)
        if self.backend == "sqlite":
            self.assertEqual(await db.read("search", thd_search, "zebracorn"), [])
        await db.run("delete bundle", thd_delete, "drop_bundles", ids["bundle"])
        for table in (drop_recipients, drop_files):
            self.assertEqual(await db.read("left", thd_count, table), 0, table.name)
        await db.run("delete user", lambda c: c.execute(delete(users)))
        for table in (messages, threads, fetch_folders, mailapi_mail, webhook_deliveries):
            self.assertEqual(await db.read("left", thd_count, table), 0, table.name)

    async def test_rows_survive_the_way_down(self) -> None:
        db, ids = await self.at_0068_migrated()
        await deferToThread(downgrade_to, db.engine, BEFORE)
        self.assertEqual(await db.read("ids", thd_ids, messages),
                         [ids["message"], ids["newest:messages"]])
        if self.backend == "sqlite":
            self.assertEqual(await db.read("search", thd_search, "zebracorn"),
                             [ids["message"]])
        await deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("ids", thd_ids, drop_files),
                         [ids["file"], ids["newest:drop_files"]])


class SQLiteRowIdMigrationTests(RowIdMigrationMixin, TestCase):
    backend = "sqlite"

    async def test_indexes_and_triggers_are_kept_in_their_order(self) -> None:
        """SQLite only: PostgreSQL's tables are not rebuilt."""
        db = await self.open_database_before(BEFORE)
        before = await db.read("before", thd_dependents)
        await deferToThread(upgrade_to, db.engine, REVISION)  # later ones add tables
        after = await db.read("after", thd_dependents)
        self.assertEqual(after, before)
        self.assertIn(("index", "ix_messages_signature_unscanned",
                       "CREATE INDEX ix_messages_signature_unscanned ON messages (id) "
                       "WHERE signature_phone IS NULL"), after["messages"])
        self.assertEqual(len([t for t, _, _ in after["messages"] if t == "trigger"]), 8)


class PostgresRowIdMigrationTests(RowIdMigrationMixin, TestCase):
    backend = "postgresql"
    timeout = 240
