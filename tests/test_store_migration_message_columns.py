"""Migration 0025 on a SQLite store holding mail: `messages` is rebuilt with its large text
columns last, and nothing else changes: the same rows, indexes and triggers, the rows that
reference a message still cascade from it, the full-text index still finds it. PostgreSQL is
left as it was."""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

from sqlalchemy import Connection, select
from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailcore.messages import MessageQuery, MessageStore
from mailcore.messages.store import thd_list_messages, thd_thread_ids
from mailcore.store.migrate import MIGRATIONS, downgrade_to, upgrade_to
from mailcore.store.schema import messages
from mailcore.workers import CpuPool
from tests.support.db import DatabaseMixin, open_database, query_plans
from tests.support.fetchenv import thd_make_user

BEFORE = "0024_search_order"
REVISION = "0025_message_columns"  # the migration these tests are about
LAST = ("cc", "in_reply_to", "references", "parse_problems", "headers", "body_text",
        "body_html", "search_extra")

_FIRST = (b"Subject: Lunch\r\nMessage-ID: <one@x.test>\r\nCc: Carol <carol@z.test>\r\n"
          b"Content-Type: multipart/mixed; boundary=B\r\n\r\n"
          b"--B\r\nContent-Type: text/plain\r\n\r\n" + b"wombat soup " * 6000 + b"\r\n--B\r\n"
          b"Content-Type: application/pdf; name=\"menu.pdf\"\r\n"
          b"Content-Disposition: attachment\r\n\r\n%PDF\r\n--B--\r\n")
_REPLY = (b"Subject: Re: Lunch\r\nMessage-ID: <two@x.test>\r\nIn-Reply-To: <one@x.test>\r\n"
          b"References: <one@x.test>\r\nContent-Type: text/html\r\n\r\n"
          b"<p>" + b"kumquat pie, " * 5000 + b"</p>\r\n")
_PLAIN = b"Subject: Walrus\r\nTo: Dora <dora@q.test>\r\n\r\nplain words\r\n"
_LATE = b"Subject: Later\r\n\r\nnarwhal\r\n"


def _migration() -> ModuleType:
    """The migration's module (its file name is not an importable name)."""
    spec = importlib.util.spec_from_file_location(
        "migration_0025", MIGRATIONS / "versions" / "0025_message_columns.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _columns(conn: Connection) -> list[str]:
    """The columns of `messages` in their stored order."""
    if conn.dialect.name == "sqlite":
        return [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(messages)")]
    return [r[0] for r in conn.exec_driver_sql(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'messages' "
        "AND table_schema = current_schema() ORDER BY ordinal_position")]


def _rows(conn: Connection) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in conn.execute(select(messages).order_by(messages.c.id))]


def _schema(conn: Connection) -> list[tuple[str, str, str]]:
    """Indexes and triggers of `messages` with their SQL (automatic ones by name), in the
    order they were made (SQLite: the planner breaks ties by it)."""
    if conn.dialect.name != "sqlite":
        return [tuple(r) for r in conn.exec_driver_sql(
            "SELECT 'index', indexname, indexdef FROM pg_indexes WHERE tablename = 'messages' "
            "UNION ALL SELECT 'trigger', tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t "
            "WHERE tgrelid = 'messages'::regclass ORDER BY 1, 2")]
    return [tuple(r) for r in conn.exec_driver_sql(
        "SELECT type, name, coalesce(sql, '') FROM sqlite_master WHERE tbl_name = 'messages' "
        "AND type IN ('index', 'trigger') ORDER BY rowid")]


def _counts(conn: Connection) -> dict[str, int]:
    """Rows referencing messages, and the counts the triggers keep."""
    one = {table: int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar() or 0)
           for table in ("message_attachments", "message_refs", "threads")}
    one["total"] = int(conn.exec_driver_sql(
        "SELECT coalesce(sum(total), 0) FROM message_counts").scalar() or 0)
    one["thread_sizes"] = int(conn.exec_driver_sql(
        "SELECT coalesce(sum(message_count), 0) FROM threads").scalar() or 0)
    return one


class MessageColumnsMixin(DatabaseMixin):
    async def test_rebuilt_with_the_long_columns_last_and_nothing_else_changed(self) -> None:
        db = await self.open_database(migrate=False)
        await threads.deferToThread(upgrade_to, db.engine, BEFORE)
        user = await db.run("make_user", thd_make_user, "owner")
        store = MessageStore(db, CpuPool.for_tests(), Clock())
        ids = [await store.add_message(user, raw) for raw in (_FIRST, _REPLY, _PLAIN)]
        old_columns = await db.read("columns", _columns)
        rows, schema = await db.read("rows", _rows), await db.read("schema", _schema)
        counts = await db.read("counts", _counts)
        self.assertEqual(counts["message_attachments"], 1)
        self.assertEqual(counts["thread_sizes"], 3)

        # To this migration only: later ones change the schema on purpose.
        await threads.deferToThread(upgrade_to, db.engine, REVISION)
        columns = await db.read("columns", _columns)
        self.assertEqual(sorted(columns), sorted(old_columns))
        if self.backend == "sqlite":
            self.assertNotEqual(columns, old_columns)
            self.assertEqual(tuple(columns[-len(LAST):]), LAST)
            self.assertEqual(columns[:3], ["id", "user_id", "account_id"])
        else:
            self.assertEqual(columns, old_columns)
        self.assertEqual(await db.read("schema", _schema), schema)
        self.assertEqual(await db.read("rows", _rows), rows)
        self.assertEqual(await db.read("counts", _counts), counts)

        # The triggers are back: a new message is counted, threaded and indexed.
        late = await store.add_message(user, _LATE)
        grown = await db.read("counts", _counts)
        self.assertEqual(grown["total"], counts["total"] + 1)

        async def found(q: str) -> list[int]:
            page = await store.list_messages(user, MessageQuery(q=q, ordering="id"))
            return [m.id for m in page.items]

        for q, want in [("wombat", ids[:1]), ("carol", ids[:1]), ("kumquat", ids[1:2]),
                        ("menu.pdf", ids[:1]), ("dora plain", ids[2:]), ("narwhal", [late])]:
            self.assertEqual(await found(q), want, q)
        detail = await store.get_message(user, ids[1])
        self.assertIn("kumquat pie", detail.body_text + detail.body_html)

        # What references a message still does, and goes with it.
        def delete_first(conn: Connection) -> None:
            conn.execute(messages.delete().where(messages.c.id == ids[0]))

        await db.run("delete_first", delete_first)
        left = await db.read("counts", _counts)
        self.assertEqual(left["message_attachments"], 0)
        self.assertEqual(left["total"], grown["total"] - 1)
        self.assertEqual(await found("wombat"), [])
        if self.backend == "sqlite":
            def checks(conn: Connection) -> list[Any]:
                conn.exec_driver_sql(
                    "INSERT INTO messages_fts (messages_fts) VALUES ('integrity-check')")
                return [tuple(r) for r in conn.exec_driver_sql("PRAGMA foreign_key_check")] \
                    + [bool(conn.exec_driver_sql("PRAGMA foreign_keys").scalar())]

            self.assertEqual(await db.run("checks", checks), [True])
        self.assertEqual(tuple(_migration().LAST), LAST)

    async def test_a_downgrade_that_rebuilds_a_table_keeps_what_references_it(self) -> None:
        """0017's downgrade rebuilds `messages` (Alembic's batch mode: copy, DROP TABLE,
        rename). With SQLite's foreign keys on, DROP TABLE deleted every attachment and
        reference row of every message first (ON DELETE CASCADE)."""
        db = await self.open_database()
        user = await db.run("make_user", thd_make_user, "owner")
        store = MessageStore(db, CpuPool.for_tests(), Clock())
        for raw in (_FIRST, _REPLY):
            await store.add_message(user, raw)
        counts = await db.read("counts", _counts)

        def referencing(conn: Connection) -> tuple[int, ...]:
            return tuple(int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar()
                             or 0) for table in ("messages", "message_attachments",
                                                 "message_refs"))

        self.assertEqual(await db.read("referencing", referencing), (2, 1, 1))
        await threads.deferToThread(downgrade_to, db.engine, "0016_job_leases")
        self.assertEqual(await db.read("referencing", referencing), (2, 1, 1))
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("counts", _counts), counts)


class SQLiteMessageColumnsTests(MessageColumnsMixin, TestCase):
    backend = "sqlite"


class PostgreSQLMessageColumnsTests(MessageColumnsMixin, TestCase):
    backend = "postgresql"


class ReorderedTests(SynchronousTestCase):
    """The CREATE TABLE rewrite itself: quoted names, commas in defaults and in brackets."""

    def test_the_listed_columns_go_last_in_their_order(self) -> None:
        m = _migration()
        sql = ("CREATE TABLE messages (\n\tid INTEGER NOT NULL, \n\tbody_text TEXT DEFAULT "
               "'a, (b' NOT NULL, \n\t\"references\" TEXT DEFAULT '' NOT NULL, \n\tsize "
               "NUMERIC(10, 2), \n\tcc TEXT, \n\tCONSTRAINT pk PRIMARY KEY (id), \n\t"
               "CONSTRAINT u UNIQUE (size, cc)\n)")
        new, order = m.reordered(sql, "messages_new")
        self.assertEqual(order, ["id", "size", "cc", "references", "body_text"])
        self.assertEqual(new, (
            'CREATE TABLE "messages_new" (\n\tid INTEGER NOT NULL,\n\tsize NUMERIC(10, 2),\n\t'
            "cc TEXT,\n\t\"references\" TEXT DEFAULT '' NOT NULL,\n\tbody_text TEXT DEFAULT "
            "'a, (b' NOT NULL,\n\tCONSTRAINT pk PRIMARY KEY (id),\n\t"
            "CONSTRAINT u UNIQUE (size, cc)\n)"))


def _user_index_made_last(conn: Connection) -> None:
    """Make the user's date index again, so that SQLite meets it after the thread's."""
    conn.exec_driver_sql("DROP INDEX ix_messages_user_date")
    conn.exec_driver_sql("CREATE INDEX ix_messages_user_date ON messages (user_id, date)")


class ThreadListPlanTests(TestCase):
    """The thread list (SQLite, no statistics) looks for an older message of each row's
    thread through the thread's index, whichever index SQLite met first: an index rebuilt
    later (as migration 0025 could have) must not turn it into a walk over every message of
    the user for each row of the page."""

    async def test_each_thread_is_read_through_its_index(self) -> None:
        db = await open_database(self, "sqlite")
        user = await db.run("make_user", thd_make_user, "owner")
        store = MessageStore(db, CpuPool.for_tests(), Clock())
        await store.add_message(user, _PLAIN)

        def plan(conn: Connection) -> list[str]:
            return query_plans(conn, lambda statement: "older" in statement, lambda: (
                thd_list_messages(conn, user, MessageQuery(limit=50, threads_only=True))))[-1]

        for _ in range(2):
            steps = await db.read("plan", plan)
            self.assertIn("SEARCH older USING INDEX ix_messages_thread_date (thread_id=?)",
                          steps)
            await db.run("user_index_made_last", _user_index_made_last)

    async def test_a_threads_messages_are_read_through_its_index(self) -> None:
        """One thread's messages (a message's thread, a list filtered by thread_id) are
        read through the thread's index, also when the user's index was made last."""
        db = await open_database(self, "sqlite")
        user = await db.run("make_user", thd_make_user, "owner")
        store = MessageStore(db, CpuPool.for_tests(), Clock())
        row_id = await store.add_message(user, _PLAIN)
        thread_id = await db.read("thread_of", lambda conn: conn.execute(
            select(messages.c.thread_id).where(messages.c.id == row_id)).scalar_one())
        self.assertIsNotNone(thread_id)

        def plans(conn: Connection) -> list[list[str]]:
            def reads() -> None:
                self.assertEqual(thd_thread_ids(conn, user, row_id), [row_id])
                page = thd_list_messages(conn, user, MessageQuery(limit=50,
                                                                  thread_id=thread_id))
                self.assertEqual([m.id for m in page.items], [row_id])

            return query_plans(conn, lambda statement: (
                "thread_id =" in statement and "FROM messages" in statement), reads)

        for _ in range(2):
            found = await db.read("plans", plans)
            self.assertGreaterEqual(len(found), 2)
            for steps in found:
                self.assertTrue(any("USING INDEX ix_messages_thread_date (thread_id=?)" in s
                                    for s in steps), steps)
            await db.run("user_index_made_last", _user_index_made_last)
