"""Alembic migrations build exactly the declared schema, on SQLite and on PostgreSQL.

The tables declared in mailcore.store.schema are the truth; the migrations must build them
column for column, index for index. Each test runs on both backends.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, create_engine, event, inspect, text
from twisted.internet import defer, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailcore.config import ConfigError
from mailcore.store import Database, migrate, schema
from mailcore.store.engine import SQLITE_BUSY_TIMEOUT_MS, make_engine
from mailcore.store.migrate import (
    VERSIONS,
    alembic_config,
    at_newest_revision,
    check_writable,
    current_revision,
    downgrade_to,
    head_revision,
    newest_revision,
    upgrade_to,
)
from tests.support.db import DatabaseMixin, database_url, synchronous_database
from tests.support.logs import logged

# Dialect-specific objects made by hand in migrations (full-text search), not declared.
_UNDECLARED = frozenset(getattr(schema, "FTS_TABLES", ()))


def _declared(name: str | None, type_: str, parent_names: Any) -> bool:
    """Alembic include_name hook: compare everything except the hand-made FTS objects."""
    if type_ == "table":
        return name not in _UNDECLARED
    return parent_names.get("table_name") not in _UNDECLARED


def _unquote(sql: str) -> str:
    """A default's SQL text without wrapping parentheses or one level of quotes."""
    sql = sql.strip()
    while sql.startswith("(") and sql.endswith(")"):
        sql = sql[1:-1].strip()
    if len(sql) >= 2 and sql[0] == sql[-1] and sql[0] in "'\"":
        sql = sql[1:-1]
    return sql


def _same_default(
    context: Any,
    inspected_column: Any,
    metadata_column: Any,
    inspected_default: str | None,
    metadata_default: Any,
    rendered_metadata_default: str | None,
) -> bool | None:
    """Alembic hook: False (no change) when two defaults differ only in quoting.

    SQLite reflects `DEFAULT ''` as the text `''` and Alembic compares it with the bare
    empty string; anything else goes to Alembic's own comparison (None).
    """
    if inspected_default is not None and rendered_metadata_default is not None:
        if _unquote(inspected_default) == _unquote(rendered_metadata_default):
            return False
    return None


def schema_diff(conn: Connection) -> list[Any]:
    """What autogenerate would change to make the database match the declared schema."""
    context = MigrationContext.configure(
        conn,
        opts={
            "compare_type": True,
            "compare_server_default": _same_default,
            "include_name": _declared,
        },
    )
    return list(compare_metadata(context, schema.metadata))


def snapshot(conn: Connection) -> dict[str, Any]:
    """Tables, columns, indexes, unique and foreign keys, as the database reports them."""
    inspector = inspect(conn)
    result: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        result[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], c.get("default"))
                for c in inspector.get_columns(table)
            ],
            "indexes": sorted(
                (i["name"] or "", tuple(i["column_names"])) for i in inspector.get_indexes(table)
            ),
            "unique": sorted(
                (u["name"] or "", tuple(u["column_names"]))
                for u in inspector.get_unique_constraints(table)
            ),
            "fks": sorted(
                (f["name"] or "", tuple(f["constrained_columns"]), f["referred_table"])
                for f in inspector.get_foreign_keys(table)
            ),
        }
    return result


class MigrationTestsMixin(DatabaseMixin):
    migrated_copies = False  # each migrated database here is one the migrations built

    async def _migrated(self) -> Database:
        return await self.open_database()  # open() migrates to head, as the daemon does

    async def test_empty_database_migrates_to_exactly_the_declared_schema(self) -> None:
        db = await self._migrated()
        self.assertEqual(await db.read("schema_diff", schema_diff), [])
        tables = set(await db.read("snapshot", snapshot))
        self.assertTrue(set(schema.metadata.tables) <= tables)
        self.assertIn("alembic_version", tables)

    async def test_migrations_reach_the_head_revision(self) -> None:
        db = await self.open_database(migrate=False)
        self.assertIsNone(await threads.deferToThread(current_revision, db.engine))
        await db.open()
        head = head_revision()
        self.assertIsNotNone(head)
        self.assertEqual(await threads.deferToThread(current_revision, db.engine), head)

    async def test_migrating_twice_is_a_no_op(self) -> None:
        db = await self._migrated()
        before = await db.read("snapshot", snapshot)
        await db.open()  # migrates again
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("snapshot", snapshot), before)
        self.assertEqual(await db.read("schema_diff", schema_diff), [])

    async def test_downgrade_to_base_then_upgrade(self) -> None:
        db = await self._migrated()
        await threads.deferToThread(downgrade_to, db.engine, "base")
        left = set(await db.read("snapshot", snapshot)) - {"alembic_version"}
        self.assertEqual(left, set())
        self.assertIsNone(await threads.deferToThread(current_revision, db.engine))
        await threads.deferToThread(db.migrate_blocking)
        self.assertEqual(await db.read("schema_diff", schema_diff), [])

    async def test_a_store_at_head_is_checked_without_alembic(self) -> None:
        """The check every command and daemon start makes: at head, no Alembic run."""
        db = await self._migrated()
        self.assertTrue(await threads.deferToThread(at_newest_revision, db.engine))

        def no_alembic(engine: Any, revision: str) -> None:
            raise AssertionError(f"Alembic ran to {revision} on a store at head")

        self.patch(migrate, "upgrade_to", no_alembic)
        await threads.deferToThread(db.migrate_blocking)
        await db.open()

    async def test_a_store_one_revision_behind_is_still_migrated(self) -> None:
        """The cheap check at head must not take a store just behind it for one at head."""
        db = await self._migrated()
        previous = sorted(path.stem for path in VERSIONS.glob("[0-9]*.py"))[-2]
        await threads.deferToThread(downgrade_to, db.engine, previous)
        self.assertFalse(await threads.deferToThread(at_newest_revision, db.engine))
        await db.open()
        self.assertEqual(await threads.deferToThread(current_revision, db.engine),
                         head_revision())
        self.assertEqual(await db.read("schema_diff", schema_diff), [])

    async def test_an_empty_store_is_not_at_head(self) -> None:
        db = await self.open_database(migrate=False)
        self.assertFalse(await threads.deferToThread(at_newest_revision, db.engine))

    async def test_concurrent_migrations_in_one_process(self) -> None:
        """Several Databases opening at once (daemon store, queue results ...) all migrate.

        Alembic keeps the running migration in module globals; unserialised, concurrent
        runs in pool threads fail with KeyError('script') and the like.
        """
        opening = [
            defer.Deferred.fromCoroutine(self.open_database(max_threads=1)) for _ in range(6)
        ]
        opened = await defer.gatherResults(opening, consumeErrors=True)
        for db in opened:
            self.assertEqual(await db.read("schema_diff", schema_diff), [])


    async def test_schema_newer_than_the_code_is_a_one_line_config_error(self) -> None:
        """A node on older code meeting a schema a newer node migrated is refused in one
        line (Alembic raised CommandError "Can't locate revision", a traceback)."""
        db = await self._migrated()

        def move_ahead(conn: Connection) -> None:
            conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))

        await db.run("move_ahead", move_ahead)
        try:
            await threads.deferToThread(db.migrate_blocking)
        except ConfigError as e:
            message = str(e)
        else:
            self.fail("a schema newer than the code was migrated")
        self.assertIn("9999_future", message)
        self.assertIn("newer than this version of Mailcore", message)
        self.assertNotIn("\n", message)


class MigrationFilesTests(SynchronousTestCase):
    """What `newest_revision` (the cheap check of a store at head) relies on."""

    def test_each_file_is_named_for_its_revision_and_revises_the_one_before(self) -> None:
        from alembic.script import ScriptDirectory

        script = ScriptDirectory.from_config(alembic_config())
        revisions = {Path(s.path).stem: s for s in script.walk_revisions()}
        names = sorted(path.stem for path in VERSIONS.glob("[0-9]*.py"))
        self.assertEqual(sorted(revisions), names)
        for before, name in zip([None, *names], names, strict=False):
            self.assertEqual(revisions[name].revision, name)
            self.assertEqual(revisions[name].down_revision, before)

    def test_the_newest_file_is_alembic_head(self) -> None:
        self.assertEqual(newest_revision(), head_revision())


def _migrate_at_once(url: str, processes: int = 2) -> list[str]:
    """Start `processes` children that each migrate `url` to head, all let go at once."""
    children = [
        subprocess.Popen([sys.executable, "-m", "tests.support.migrate_child", url],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(processes)
    ]
    results = []
    try:
        for child in children:
            assert child.stdout is not None
            assert child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        for child in children:
            out, _ = child.communicate(timeout=120)
            results.append(out.strip())
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    return results


class SQLiteMigrationTests(MigrationTestsMixin, TestCase):
    backend = "sqlite"

    async def test_a_migration_gives_its_wal_back(self) -> None:
        """A migration's writes go through the WAL (0069's table rebuilds: about twice the
        tables), and SQLite keeps the file at its largest while a connection is open: the
        daemon, which keeps its connections, held it for as long as it ran."""
        db = await self.open_database(migrate=False)
        await threads.deferToThread(upgrade_to, db.engine, "head")
        database = db.engine.url.database
        assert database is not None
        self.assertEqual(await threads.deferToThread(os.path.getsize, database + "-wal"), 0)
        self.assertTrue(await threads.deferToThread(at_newest_revision, db.engine))

    async def test_autoincrement_is_where_the_schema_declares_it(self) -> None:
        """Autogenerate does not compare `sqlite_autoincrement`, and allocate_ids reads it
        from the schema to skip ids given before: the migrated tables with AUTOINCREMENT
        are exactly those the schema declares so."""
        db = await self._migrated()
        migrated = await db.read("autoincrement", lambda conn: set(conn.execute(text(
            "SELECT name FROM sqlite_master WHERE type = 'table' "
            "AND sql LIKE '%AUTOINCREMENT%'")).scalars()))
        declared = {table.name for table in schema.metadata.tables.values()
                    if table.dialect_options["sqlite"]["autoincrement"]}
        self.assertEqual(migrated, declared)
        self.assertIn("messages", declared)

    async def test_the_check_at_head_takes_no_write_lock(self) -> None:
        """Each command checks the schema while the daemon writes: the check reads, with
        a plain BEGIN, and never waits for the daemon's write lock (BEGIN IMMEDIATE)."""
        db = await self._migrated()
        engine = make_engine(db.url)
        self.addCleanup(engine.dispose)
        statements: list[str] = []

        @event.listens_for(engine, "connect")
        def trace(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.set_trace_callback(statements.append)

        self.assertTrue(await threads.deferToThread(at_newest_revision, engine))
        self.assertIn("BEGIN", statements)
        self.assertNotIn("BEGIN IMMEDIATE", statements)


class PostgresMigrationTests(MigrationTestsMixin, TestCase):
    backend = "postgresql"

    async def _race(self, url: str) -> None:
        results = await threads.deferToThread(_migrate_at_once, url)
        self.assertEqual(results, ["OK", "OK"])
        engine = create_engine(url)
        self.addCleanup(engine.dispose)
        self.assertEqual(await threads.deferToThread(current_revision, engine), head_revision())

    async def test_two_nodes_migrate_an_empty_database_at_once(self) -> None:
        """Two nodes starting together on an empty database both start (one failed with
        UniqueViolation: both created the same tables); the advisory lock makes the second
        wait and then find the schema at head."""
        await self._race(await database_url(self, "postgresql"))

    async def test_two_nodes_migrate_an_old_schema_at_once(self) -> None:
        """A rolling upgrade: two nodes at once on a schema at 0025 (one failed with
        Alembic's CommandError "expected to match one row")."""
        url = await database_url(self, "postgresql")
        engine = create_engine(url)
        self.addCleanup(engine.dispose)
        await threads.deferToThread(upgrade_to, engine, "0025")
        await self._race(url)


class CheckWritableTests(SynchronousTestCase):
    """The daemon's start-up check that its migrated SQLite store takes writes."""

    def setUp(self) -> None:
        home = Path(self.mktemp())
        home.mkdir()
        self.path = home / "mailcore.sqlite"
        synchronous_database(f"sqlite:///{self.path}").engine.dispose()
        # Another process's write lock (the admin CLI in a long command or migration).
        self.holder = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(self.holder.close)
        self.holder.execute("BEGIN IMMEDIATE")

    def test_a_write_lock_held_elsewhere_is_not_waited_for(self) -> None:
        """It waited the whole busy timeout (30 s), then refused to start: `cannot write
        to the database …: database is locked`."""
        engine = make_engine(f"sqlite:///{self.path}", pool_size=1)
        self.addCleanup(engine.dispose)
        infos = logged(self, lambda e: e.get("log_namespace") == migrate.__name__)
        check_writable(engine, "sqlite:///mailcore.sqlite")
        self.assertEqual(infos, [
            "the database sqlite:///mailcore.sqlite is locked by another process (the admin "
            "CLI, another daemon): this daemon's writes wait for it"])
        # Its connection waits for locks as every other does again.
        with engine.connect() as conn:
            driver: Any = conn.connection.driver_connection
            timeout = driver.execute("PRAGMA busy_timeout").fetchone()[0]
        self.assertEqual(timeout, SQLITE_BUSY_TIMEOUT_MS)

    def test_a_read_only_database_is_refused_at_once_even_while_locked(self) -> None:
        engine = make_engine(f"sqlite:///file:{self.path}?mode=ro&uri=true", pool_size=1)
        self.addCleanup(engine.dispose)
        with self.assertRaises(ConfigError) as refused:
            check_writable(engine, "sqlite:///mailcore.sqlite")
        self.assertEqual(str(refused.exception), "cannot write to the database "
                         "sqlite:///mailcore.sqlite: attempt to write a readonly database")

    def test_a_database_that_takes_writes_passes(self) -> None:
        self.holder.execute("ROLLBACK")
        engine = make_engine(f"sqlite:///{self.path}", pool_size=1)
        self.addCleanup(engine.dispose)
        check_writable(engine, "sqlite:///mailcore.sqlite")
