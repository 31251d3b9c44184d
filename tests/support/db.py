"""A real, threaded Database for store and service tests, on SQLite or PostgreSQL.

Unit tests that only need a schema use `synchronous_database()` (synchronous, in memory).
Tests that check what the thread pool, the transactions or a backend really do use
`DatabaseMixin.open_database()` instead: a temp-file SQLite, or a fresh PostgreSQL database
from `tests.support.pg`, opened (migrated) and closed at the end of the test.

A migrated one is a copy of a store the migrations built once in this test process (the
SQLite file copied; PostgreSQL's CREATE DATABASE … TEMPLATE): the migrations cost each
test some 0.45 s of CPU (SQLite) to build the same thing again. Its `open()` finds it at
head, as a daemon finds its store. Tests of the migrations themselves run them on an empty
database (`migrated_copy=False`, `DatabaseMixin.migrated_copies`). A test of one migration
starts at the revision before it from a copy too: of the migrated store taken down to that
revision once per process and revision (`DatabaseMixin.open_database_before`).
"""

from __future__ import annotations

import atexit
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, event, make_url
from twisted.internet import defer, threads
from twisted.internet.testing import MemoryReactor

from mailcore.store import Database
from mailcore.store.migrate import current_revision, downgrade_to
from tests.support.pg import create_template_database, create_test_database
from tests.support.reactor import get_reactor
from tests.support.servers import tempdir

if TYPE_CHECKING:
    from twisted.trial.unittest import TestCase

    # Mixins see TestCase's methods when type-checked, and stay plain objects at run time
    # (trial would otherwise collect the mixin itself as a test class).
    MixinBase = TestCase
else:
    MixinBase = object

BACKENDS = ("sqlite", "postgresql")


async def database_url(test: TestCase, backend: str) -> str:
    """A URL of an empty database of `backend` that lives as long as `test`."""
    if backend == "sqlite":
        directory = tempdir("mailcore-sqlite-")
        test.addCleanup(shutil.rmtree, directory, True)
        return f"sqlite:///{directory / 'mailcore.sqlite'}"
    if backend == "postgresql":
        return await create_test_database(test)
    raise ValueError(f"unknown backend {backend!r}")


# Per backend: the migrated template of this process (SQLite: a file's path; PostgreSQL:
# a database's URL), made on first use.
# `synchronous_database()`: one in-memory database per process, migrated to head by the
# migrations themselves, that every new one is a page-for-page copy of.
_memory_template: Database | None = None
_memory_template_lock = threading.Lock()


def synchronous_database(url: str = "sqlite://") -> Database:
    """A synchronous database with the full schema, for unit tests: in memory by default
    (a copy of the process's migrated one), else `url` migrated to head."""
    # Synchronous: the reactor is never asked to run anything from a thread.
    db = Database(url, MemoryReactor(), synchronous=True)  # type: ignore[arg-type]
    if url == "sqlite://":
        _copy_migrated_memory(db.engine)
    else:
        db.migrate_blocking()
    return db


def _copy_migrated_memory(engine: Engine) -> None:
    """Fill the (empty) in-memory database of `engine` with a copy of the process's migrated
    one (sqlite3's backup), made by running the migrations the first time. Blocks.

    Unit tests make a fresh schema in their setUp by the thousand: running the migrations
    for each cost some 0.32 s of CPU, the copy a few milliseconds. The copy holds what the
    migrations made, triggers, full-text tables and counter rows included."""
    global _memory_template
    with _memory_template_lock:
        if _memory_template is None:
            _memory_template = synchronous_database("sqlite:///:memory:")
        source = _memory_template.engine.raw_connection()
        target = engine.raw_connection()
        try:
            source.driver_connection.backup(target.driver_connection)  # type: ignore[union-attr]
        finally:
            target.close()
            source.close()


_templates: dict[tuple[str, str], str] = {}
_templates_lock = defer.DeferredLock()
_sqlite_template_lock = threading.Lock()  # copy_migrated_sqlite_blocking's


def _migrate_template_blocking(url: str) -> None:
    """Run the migrations on the empty database at `url`, then close every connection to
    it (SQLite: its WAL is checkpointed into the file; PostgreSQL: a template must have
    none). Blocks."""
    db = Database(url, None, synchronous=True)  # type: ignore[arg-type]
    try:
        db.migrate_blocking()
    finally:
        db.engine.dispose()


def _downgrade_template_blocking(url: str, revision: str) -> None:
    """Take the database at `url` (a copy of the migrated template) down to `revision`,
    then close every connection to it. Blocks."""
    db = Database(url, None, synchronous=True)  # type: ignore[arg-type]
    try:
        downgrade_to(db.engine, revision)
    finally:
        db.engine.dispose()


async def _template(backend: str, revision: str = "head") -> str:
    """This process's database of `backend` at `revision`: at head, made by the migrations
    the first time; at an older revision, a copy of that one taken down to it the first
    time (as each migration test took its own copy down before)."""
    head = None if revision == "head" else await _template(backend)
    await _templates_lock.acquire()
    try:
        key = (backend, revision)
        if key not in _templates:
            _templates[key] = await _make_template(backend, head, revision)
        return _templates[key]
    finally:
        _templates_lock.release()


async def _make_template(backend: str, head: str | None, revision: str) -> str:
    """A template of `backend`: migrated from empty (no `head` yet), or a copy of `head`
    taken down to `revision`. Its path (SQLite) or URL (PostgreSQL)."""
    if backend == "sqlite":
        directory = tempdir("mailcore-sqlite-template-")
        atexit.register(shutil.rmtree, directory, True)
        path = directory / "mailcore.sqlite"
        url = f"sqlite:///{path}"
        if head is None:
            await threads.deferToThread(_migrate_template_blocking, url)
        else:
            await threads.deferToThread(shutil.copyfile, head, path)
            await threads.deferToThread(_downgrade_template_blocking, url, revision)
        return str(path)
    if backend == "postgresql":
        if head is None:
            url = await create_template_database(len(_templates))
            await threads.deferToThread(_migrate_template_blocking, url)
        else:
            url = await create_template_database(
                len(_templates), template=make_url(head).database)
            await threads.deferToThread(_downgrade_template_blocking, url, revision)
        return url
    raise ValueError(f"unknown backend {backend!r}")


def copy_migrated_sqlite_blocking(path: Any) -> None:
    """Make `path` (no file yet) a copy of this process's migrated SQLite template, made by
    the migrations the first time (blocks): the store of a real daemon's test, which the
    migrations cost some 0.45 s of CPU to build again (each daemon's start at an empty store
    did, or the test's own migrate_blocking). The daemon's start from an empty store is
    test_daemon's, whose stores stay empty."""
    key = ("sqlite", "head")
    with _sqlite_template_lock:
        if key not in _templates:
            directory = tempdir("mailcore-sqlite-template-")
            atexit.register(shutil.rmtree, directory, True)
            template = directory / "mailcore.sqlite"
            _migrate_template_blocking(f"sqlite:///{template}")
            _templates[key] = str(template)
    shutil.copyfile(_templates[key], path)


async def migrated_database_url(test: TestCase, backend: str, revision: str = "head") -> str:
    """A URL of a database of `backend` at `revision` that lives as long as `test`: a copy
    of this process's template migrated to it."""
    template = await _template(backend, revision)
    if backend == "postgresql":
        name = make_url(template).database
        return await create_test_database(test, template=name)
    directory = tempdir("mailcore-sqlite-")
    test.addCleanup(shutil.rmtree, directory, True)
    path = directory / "mailcore.sqlite"
    await threads.deferToThread(shutil.copyfile, template, path)
    return f"sqlite:///{path}"


async def open_database(
    test: TestCase, backend: str, *, migrate: bool = True, max_threads: int = 4,
    migrated_copy: bool = True,
) -> Database:
    """A threaded Database on the real reactor, closed when `test` ends.

    With `migrate` (the default) it is opened the daemon's way (`await db.open()`, which
    migrates to head): a copy of the process's migrated template, found at head
    (`migrated_copy`), or an empty database that the migrations run on. Without, the pool
    runs but the database stays empty.
    """
    if migrate and migrated_copy:
        url = await migrated_database_url(test, backend)
    else:
        url = await database_url(test, backend)
    db = Database(url, get_reactor(), max_threads=max_threads)
    test.addCleanup(db.close)
    if migrate:
        await db.open()
    else:
        _start_pool(db)
    return db


async def open_database_at(test: TestCase, url: str, *, max_threads: int = 4) -> Database:
    """Another threaded Database on an existing URL (as a second process would open it)."""
    db = Database(url, get_reactor(), max_threads=max_threads)
    test.addCleanup(db.close)
    await db.open()
    return db


async def hold_shared_thread(test: TestCase, db: Database
                             ) -> tuple[defer.Deferred[None], threading.Event]:
    """Hold the one shared thread of `db` (opened with max_threads=1) with a long read until
    the Event is set: what is handed to it meanwhile (writes, long reads) waits in its queue.
    Returns once the thread holds; the read's Deferred fires once it is let go."""
    entered, release = threading.Event(), threading.Event()
    test.addCleanup(release.set)

    def hold(conn: Connection) -> None:
        entered.set()
        if not release.wait(30):
            raise AssertionError("never released")

    holding = db.read_long("hold", hold)
    test.assertTrue(await threads.deferToThread(entered.wait, 30))
    return holding, release


def _start_pool(db: Database) -> None:
    """Start the pool without migrating, for tests of the migrations themselves."""
    for pool in db._pools():
        if not pool.started:
            pool.start()


class DatabaseMixin(MixinBase):
    """For TestCases parametrised by `backend` ("sqlite" or "postgresql")."""

    backend: str = "sqlite"
    # False: a migrated database is an empty one the migrations run on (their own tests).
    migrated_copies: bool = True

    async def open_database(self, *, migrate: bool = True, max_threads: int = 4) -> Database:
        """A fresh, empty database of this class's backend (migrated unless told not to)."""
        return await open_database(
            self, self.backend, migrate=migrate, max_threads=max_threads,
            migrated_copy=self.migrated_copies,
        )

    async def open_database_at(self, url: str, *, max_threads: int = 4) -> Database:
        """A second Database object on the same database."""
        return await open_database_at(self, url, max_threads=max_threads)

    async def open_database_before(self, revision: str) -> Database:
        """A fresh database of this class's backend migrated to `revision` only (the one a
        migration under test builds on), its pool running: a copy of this process's
        migrated store taken down to `revision` (once, not for each test)."""
        url = await migrated_database_url(self, self.backend, revision)
        db = Database(url, get_reactor(), max_threads=4)
        self.addCleanup(db.close)
        _start_pool(db)
        self.assertEqual(  # type: ignore[attr-defined]
            await threads.deferToThread(current_revision, db.engine), revision)
        return db


@contextmanager
def engine_query_plans(engine: Engine) -> Iterator[list[str]]:
    """Within the block, the query plan steps of every SELECT and DELETE any connection of
    `engine` runs (on whatever thread), each explained as it runs: SQLite's EXPLAIN QUERY
    PLAN lines, or PostgreSQL's EXPLAIN lines as planned with sequential scans disabled (a
    test's tables are too small for an index to be worth it otherwise), so that a step
    still "Seq Scan on" a table means no index serves it. `full_scans` picks them."""
    plans: list[str] = []
    postgresql = engine.dialect.name == "postgresql"

    def explain(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                executemany: bool) -> None:
        if executemany or statement.lstrip()[:6].upper() not in ("SELECT", "DELETE"):
            return
        if not postgresql:
            plans.extend(row[3] for row in cursor.connection.execute(
                "EXPLAIN QUERY PLAN " + statement, parameters))
            return
        with cursor.connection.cursor() as explaining:
            explaining.execute("SET enable_seqscan = off")
            try:
                explaining.execute("EXPLAIN " + statement, parameters)
                plans.extend(row[0].strip() for row in explaining.fetchall())
            finally:
                explaining.execute("RESET enable_seqscan")

    event.listen(engine, "before_cursor_execute", explain)
    try:
        yield plans
    finally:
        event.remove(engine, "before_cursor_execute", explain)


def full_scans(plans: list[str], *tables: str) -> list[str]:
    """The steps of `plans` (engine_query_plans') that read the whole of one of `tables`."""
    names = "|".join(tables)
    return [p for p in plans
            if re.match(rf"(SCAN|(->\s*)?Seq Scan on) ({names})\b", p)]


def transaction_answers(test: TestCase, db: Database, wanted: Callable[[str], bool]
                        ) -> list[tuple[str, Any]]:
    """For the rest of `test`: (name, answer) of each transaction `db.run` runs whose name
    `wanted` takes, in the order they answer (a batched delete's rows, batch by batch)."""
    answers: list[tuple[str, Any]] = []
    db_run = db.run

    def run(name: str, *args: Any, **kwargs: Any) -> Any:
        def answered(result: Any) -> Any:
            answers.append((name, result))
            return result

        d = db_run(name, *args, **kwargs)
        return d.addCallback(answered) if wanted(name) else d

    test.patch(db, "run", run)
    return answers


def query_plans(conn: Connection, wanted: Callable[[str], bool], reads: Callable[[], Any]
                ) -> list[list[str]]:
    """SQLite: run `reads` on `conn`; the query plan (its steps) of each statement it ran
    that `wanted` picks."""
    seen: list[tuple[str, Any]] = []

    def capture(_c: Any, _cur: Any, statement: str, parameters: Any, *_: Any) -> None:
        if wanted(statement):
            seen.append((statement, parameters))

    event.listen(conn, "before_cursor_execute", capture)
    try:
        reads()
    finally:
        event.remove(conn, "before_cursor_execute", capture)
    return [[r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, params)]
            for statement, params in seen]


def driver_query_plans(conn: Connection, wanted: Callable[[str], bool],
                       reads: Callable[[], Any]) -> list[list[str]]:
    """`query_plans` of the statements `reads` runs on the sqlite3 driver itself
    (`mailcore.store.prepared.Prepared`, which SQLAlchemy's events do not see), as the
    driver traces them (their values written in)."""
    raw: Any = conn.connection.driver_connection
    seen: list[str] = []
    raw.set_trace_callback(lambda statement: seen.append(statement) if wanted(statement)
                           else None)
    try:
        reads()
    finally:
        raw.set_trace_callback(None)
    return [[r[-1] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement)]
            for statement in seen]
