"""A real, threaded Database for store and service tests, on SQLite or PostgreSQL.

Unit tests that only need a schema use `Database.for_tests()` (synchronous, in memory).
Tests that check what the thread pool, the transactions or a backend really do use
`DatabaseMixin.open_database()` instead: a temp-file SQLite, or a fresh PostgreSQL database
from `tests.support.pg`, opened (migrated) and closed at the end of the test.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, event
from twisted.internet import threads

from mailcore.store import Database
from mailcore.store.migrate import current_revision, downgrade_to
from tests.support.pg import create_test_database
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


async def open_database(
    test: TestCase, backend: str, *, migrate: bool = True, max_threads: int = 4
) -> Database:
    """A threaded Database on the real reactor, closed when `test` ends.

    With `migrate` (the default) it is opened the daemon's way (`await db.open()`, which
    migrates to head); without, the pool runs but the database stays empty.
    """
    db = Database(await database_url(test, backend), get_reactor(), max_threads=max_threads)
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


def _start_pool(db: Database) -> None:
    """Start the pool without migrating, for tests of the migrations themselves."""
    for pool in db._pools():
        if not pool.started:
            pool.start()


class DatabaseMixin(MixinBase):
    """For TestCases parametrised by `backend` ("sqlite" or "postgresql")."""

    backend: str = "sqlite"

    async def open_database(self, *, migrate: bool = True, max_threads: int = 4) -> Database:
        """A fresh, empty database of this class's backend (migrated unless told not to)."""
        return await open_database(
            self, self.backend, migrate=migrate, max_threads=max_threads
        )

    async def open_database_at(self, url: str, *, max_threads: int = 4) -> Database:
        """A second Database object on the same database."""
        return await open_database_at(self, url, max_threads=max_threads)

    async def open_database_before(self, revision: str) -> Database:
        """A fresh database of this class's backend migrated to `revision` only (the one a
        migration under test builds on)."""
        db = await self.open_database()
        await threads.deferToThread(downgrade_to, db.engine, revision)
        self.assertEqual(  # type: ignore[attr-defined]
            await threads.deferToThread(current_revision, db.engine), revision)
        return db


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
