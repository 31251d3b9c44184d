"""The Database on a real backend: work on its thread pool, whole transactions, SQLite durability.

Every test runs twice, on a temp-file SQLite and on PostgreSQL (the throwaway cluster from
tests.support.pg, or MAILCORE_TEST_PG_URL).
"""

from __future__ import annotations

import datetime
import sqlite3
import threading
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, event, func, insert, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailcore.store import Database, StoreError
from mailcore.store.database import RELAXED_CHECKPOINT_PAGES, _Work
from mailcore.store.engine import (
    PG_TCP_SETTINGS,
    SQLITE_BUSY_TIMEOUT_MS,
    SQLITE_CHECKPOINT_PAGES,
)
from mailcore.store.errands import Errand
from mailcore.store.schema import credentials, users
from tests.support.db import DatabaseMixin, hold_shared_thread, synchronous_database
from tests.support.reactor import get_reactor
from tests.support.servers import sleep

_NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def _add_user(conn: Connection, name: str) -> int:
    result = conn.execute(
        insert(users).values(
            username=name, email=f"{name}@example.test", nic=f"MC-{name}", created_at=_NOW
        )
    )
    key: Any = result.inserted_primary_key
    return int(key[0])


def _count_users(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(users)).scalar_one())


def _sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code
    return error


class Boom(Exception):
    """Raised inside a transaction to check that it rolls back."""


class DatabaseTestsMixin(DatabaseMixin):
    """The behaviour both backends share. Mixed into one TestCase per backend."""

    db: Database
    lane_threads: int

    async def setUp(self) -> None:  # type: ignore[override]
        self.db = await self.open_database()

    async def test_reads_take_a_lane_of_their_own(self) -> None:
        """Short reads run on the read lane's threads (one on SQLite, two on PostgreSQL);
        writes and long reads (a full-text search) on the shared pool's. A read answers
        while every shared thread is held, one of them by a write."""

        def thread_name(conn: Connection) -> str:
            return threading.current_thread().name

        reads = await defer.gatherResults(
            [self.db.read("where", thread_name) for _ in range(16)])
        writes = await defer.gatherResults(
            [self.db.run("where", thread_name) for _ in range(8)])
        long_reads = await defer.gatherResults(
            [self.db.read_long("where", thread_name) for _ in range(8)])
        self.assertLessEqual(len(set(reads)), self.lane_threads)
        self.assertTrue(all("mailcore-db-read" in name for name in reads))
        self.assertFalse(any("mailcore-db-read" in name for name in writes + long_reads))

        release = threading.Event()
        held = threading.Semaphore(0)

        def hold(conn: Connection) -> None:
            held.release()
            release.wait(30)

        # The shared pool's four threads: one in a write transaction, three in long reads
        # (SQLite lets one writer in at a time: three more writes would wait in BEGIN
        # IMMEDIATE for its busy timeout, 30 s, and never say they are in).
        holding = [self.db.run("hold", hold)] + [
            self.db.read_long("hold", hold) for _ in range(3)]
        try:
            entered = await threads.deferToThread(
                lambda: [held.acquire(timeout=30) for _ in holding])
            self.assertEqual(entered, [True] * 4)
            self.assertIn("mailcore-db-read", await self.db.read("where", thread_name))
        finally:
            release.set()
            await defer.gatherResults(holding)

    async def test_run_and_read_return_results_from_a_pool_thread(self) -> None:
        """Work runs on the Database's own threads; its result comes back in the Deferred."""
        reactor_thread = threading.get_ident()

        def txn(conn: Connection, name: str) -> tuple[int, int]:
            return _add_user(conn, name), threading.get_ident()

        d = self.db.run("add_user", txn, "alice")
        self.assertIsInstance(d, defer.Deferred)
        user_id, thread = await d
        self.assertNotEqual(thread, reactor_thread)
        self.assertIsInstance(user_id, int)

        def names(conn: Connection) -> tuple[list[str], int]:
            rows = conn.execute(select(users.c.username)).scalars().all()
            return list(rows), threading.get_ident()

        found, thread = await self.db.read("names", names)
        self.assertEqual(found, ["alice"])
        self.assertNotEqual(thread, reactor_thread)

    async def test_run_prepared_prepares_outside_the_write_transaction(self) -> None:
        """`run_prepared` runs `prepare(read)` and then `fn(conn, prepared)` on one pool
        thread (no trip through the reactor between them). While `prepare` works, no
        transaction is open but the reads it asks for: another writer commits meanwhile
        (on SQLite it would wait for the write lock), and `fn` sees that write. A failing
        `prepare` fails the call, and `fn` does not run."""
        reactor_thread = threading.get_ident()
        await self.db.run("add", _add_user, "alice")

        def names(conn: Connection) -> list[str]:
            return sorted(conn.execute(select(users.c.username)).scalars().all())

        def write_elsewhere() -> None:
            with self.db.engine.connect() as conn, conn.begin():
                _add_user(conn, "bob")

        def prepare(read: Any) -> tuple[list[str], int]:
            seen = read(names)
            other = threading.Thread(target=write_elsewhere)
            other.start()
            other.join()
            return seen, threading.get_ident()

        def fn(conn: Connection, prepared: tuple[list[str], int]) -> tuple[Any, ...]:
            _add_user(conn, "carol")
            return prepared, names(conn), threading.get_ident()

        (before, prepare_thread), after, thread = await self.db.run_prepared(
            "prepared", prepare, fn)
        self.assertEqual((before, after), (["alice"], ["alice", "bob", "carol"]))
        self.assertEqual(prepare_thread, thread)
        self.assertNotEqual(thread, reactor_thread)

        def failing(read: Any) -> None:
            raise Boom()

        ran: list[object] = []
        with self.assertRaises(Boom):
            await self.db.run_prepared("prepared", failing, lambda c, p: ran.append(p))
        self.assertEqual(ran, [])

    async def test_stream_commits_batches_back_to_back_and_reports_each(self) -> None:
        """`stream` runs one transaction per batch on a pool thread, calls `done` in the
        reactor thread after each, and ends when `take` has nothing more."""
        reactor_thread = threading.get_ident()
        batches: list[list[str]] = [["a1", "a2"], ["b1"]]
        done: list[tuple[list[str], Any, int]] = []

        def txn(conn: Connection, batch: list[str]) -> int:
            for name in batch:
                _add_user(conn, name)
            return threading.get_ident()

        def report(batch: list[str], result: Any) -> None:
            done.append((batch, result, threading.get_ident()))

        await self.db.stream("users", lambda: batches.pop(0) if batches else None, txn,
                             report)
        self.assertEqual([b for b, _, _ in done], [["a1", "a2"], ["b1"]])
        self.assertEqual({t for _, _, t in done}, {reactor_thread})
        self.assertNotIn(reactor_thread, {r for _, r, _ in done})
        self.assertEqual(await self.db.read("n", _count_users), 3)

    async def test_stream_reports_a_failed_batch_and_stops(self) -> None:
        batches: list[list[str]] = [["ok"], ["dup", "dup"], ["never"]]
        done: list[tuple[list[str], Any]] = []

        def txn(conn: Connection, batch: list[str]) -> None:
            for name in batch:
                _add_user(conn, name)

        await self.db.stream("users", lambda: batches.pop(0) if batches else None, txn,
                             lambda b, r: done.append((b, r)))
        self.assertEqual([b for b, _ in done], [["ok"], ["dup", "dup"]])
        self.assertIsNone(done[0][1])
        self.assertIsInstance(done[1][1], Failure)
        self.assertTrue(done[1][1].check(IntegrityError))
        self.assertEqual(batches, [["never"]])
        self.assertEqual(await self.db.read("n", _count_users), 1)

    async def test_a_reading_thread_keeps_its_connection_and_sees_each_commit(self) -> None:
        """A thread that reads keeps one connection for its reads (no pool checkout a read);
        each read is a transaction of its own, so it sees what committed before it; a
        read that fails leaves the connection usable; close() closes it."""

        def driver(conn: Connection) -> tuple[int, Any]:
            return threading.get_ident(), conn.connection.driver_connection

        def fail(conn: Connection) -> None:
            conn.exec_driver_sql("SELECT * FROM no_such_table")

        seen = [await self.db.read("which", driver)]
        self.assertEqual(await self.db.read("count", _count_users), 0)
        await self.db.run("add", _add_user, "lane")
        self.assertEqual(await self.db.read("count", _count_users), 1)
        with self.assertRaises(DBAPIError):
            await self.db.read("fails", fail)
        self.assertEqual(await self.db.read("count", _count_users), 1)
        seen += await defer.gatherResults([self.db.read("which", driver) for _ in range(8)])
        by_thread: dict[int, set[int]] = {}
        for thread, conn in seen:
            by_thread.setdefault(thread, set()).add(id(conn))
        self.assertEqual([len(conns) for conns in by_thread.values()], [1] * len(by_thread))
        held = list(self.db._held_conns)
        self.assertGreaterEqual(len(held), len(by_thread))  # a count may have run elsewhere
        self.assertLessEqual(len(held), 4)  # at most one a pool thread
        await self.db.close()
        self.assertTrue(all(conn.closed for conn in held))

    async def test_exception_rolls_back_the_whole_transaction(self) -> None:
        """Everything a failing function wrote is undone, and its exception reaches the caller."""

        def txn(conn: Connection) -> None:
            _add_user(conn, "first")
            _add_user(conn, "second")
            raise Boom("after two inserts")

        with self.assertRaises(Boom):
            await self.db.run("failing", txn)
        self.assertEqual(await self.db.read("count", _count_users), 0)

    async def test_integrity_error_rolls_back_and_propagates(self) -> None:
        def txn(conn: Connection) -> None:
            _add_user(conn, "dup")
            _add_user(conn, "other")
            _add_user(conn, "dup")

        with self.assertRaises(IntegrityError):
            await self.db.run("duplicate", txn)
        self.assertEqual(await self.db.read("count", _count_users), 0)

    async def test_foreign_keys_are_enforced(self) -> None:
        def txn(conn: Connection) -> None:
            conn.execute(
                insert(credentials).values(
                    user_id=12345, kind="apikey", prefix="abcd1234", digest=b"\0" * 32,
                    created_at=_NOW,
                )
            )

        with self.assertRaises(IntegrityError):
            await self.db.run("orphan_credential", txn)

    async def test_concurrent_read_then_write_transactions_all_commit(self) -> None:
        """Many writers at once, from two engines (as two processes would), none fails.

        Each transaction reads before it writes: on SQLite a plain BEGIN would fail the
        read-to-write upgrade with "database is locked"; BEGIN IMMEDIATE plus the busy
        timeout and the retry make every one of them commit.
        """
        other = await self.open_database_at(self.db.url)

        def txn(conn: Connection, name: str) -> int:
            before = _count_users(conn)
            _add_user(conn, name)
            return before

        writes = [
            (self.db if i % 2 else other).run("concurrent_add", txn, f"user{i}")
            for i in range(40)
        ]
        results = await defer.gatherResults(writes, consumeErrors=True)
        self.assertEqual(await self.db.read("count", _count_users), 40)
        if self.db.is_sqlite:
            # Serialised: every transaction saw a different number of earlier rows.
            self.assertEqual(sorted(results), list(range(40)))

    async def test_read_does_not_wait_for_a_writer(self) -> None:
        """A read transaction runs while a write transaction is open and sees committed data."""
        await self.db.run("add_user", _add_user, "committed")
        inserted = threading.Event()
        release = threading.Event()

        def slow_writer(conn: Connection) -> None:
            _add_user(conn, "uncommitted")
            inserted.set()
            if not release.wait(30):
                raise AssertionError("never released")

        writer = self.db.run("slow_writer", slow_writer)
        self.addCleanup(release.set)
        self.assertTrue(await threads.deferToThread(inserted.wait, 30))
        count = await self.db.read("count", _count_users)
        self.assertFalse(writer.called)
        self.assertEqual(count, 1)
        release.set()
        await writer
        self.assertEqual(await self.db.read("count", _count_users), 2)

    async def test_close_finishes_queued_work(self) -> None:
        """close() lets transactions already queued commit before the threads stop."""
        db = Database(self.db.url, get_reactor(), max_threads=1)
        await db.open()
        pending = [db.run("add_user", _add_user, f"late{i}") for i in range(5)]
        await db.close()
        self.assertTrue(all(d.called for d in pending))
        await defer.gatherResults(pending)
        self.assertEqual(await self.db.read("count", _count_users), 5)


    async def test_work_after_close_fails_instead_of_hanging(self) -> None:
        """A closed Database refuses work at once (a stopped pool would drop it silently)."""
        db = Database(self.db.url, get_reactor(), max_threads=1)
        await db.open()
        await db.close()
        with self.assertRaises(StoreError):
            await db.run("late", _add_user, "late")


    # -- work its caller gave up on --------------------------------------------------------

    async def held_pool(self) -> tuple[Database, defer.Deferred[None], threading.Event]:
        """A Database whose one shared thread is held (a long read) until the Event is set:
        what is handed to it meanwhile waits in the queue."""
        db = await self.open_database_at(self.db.url, max_threads=1)
        holding, release = await hold_shared_thread(self, db)
        return db, holding, release

    async def test_a_write_cancelled_while_queued_never_begins(self) -> None:
        """A write whose caller gave up (cancelled its Deferred: a reply deadline, a client
        gone) before a thread took it is dropped: it fails with CancelledError at once, and
        nothing of it runs when the thread is free, so a client told it failed that sends it
        again does not find it stored twice. Work behind it runs as before."""
        db, holding, release = await self.held_pool()
        ran: list[str] = []

        def add(conn: Connection, name: str) -> int:
            ran.append(name)
            return _add_user(conn, name)

        given_up = db.run("add_user", add, "late")
        kept = db.run("add_user", add, "kept")
        given_up.cancel()
        with self.assertRaises(defer.CancelledError):
            await given_up
        release.set()
        await holding
        await kept
        self.assertEqual(ran, ["kept"])
        names = await db.read("names", lambda conn: list(
            conn.execute(select(users.c.username)).scalars()))
        self.assertEqual(names, ["kept"])

    async def test_a_read_cancelled_while_queued_never_runs(self) -> None:
        """A stalled store builds no backlog of reads nobody waits for: those given up
        while queued are skipped when it answers again, and the live read behind them is
        answered next."""
        db, holding, release = await self.held_pool()
        ran: list[int] = []

        def read(conn: Connection, n: int) -> int:
            ran.append(n)
            return _count_users(conn)

        dead = [db.read_long("dead", read, n) for n in range(50)]
        live = db.read_long("live", read, 50)
        for d in dead:
            d.cancel()
        release.set()
        await holding
        self.assertEqual(await live, 0)
        self.assertEqual(ran, [50])
        for d in dead:
            self.failureResultOf(d, defer.CancelledError)

    async def test_a_write_cancelled_once_begun_ends_unheard(self) -> None:
        """A write a thread has begun is not interrupted inside its transaction: its
        Deferred fails with CancelledError at once, and the write commits as it would have
        (its outcome unheard)."""
        db = await self.open_database_at(self.db.url, max_threads=1)
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)

        def slow(conn: Connection) -> int:
            user = _add_user(conn, "begun")
            entered.set()
            if not release.wait(30):
                raise AssertionError("never released")
            return user

        begun = db.run("slow", slow)
        self.assertTrue(await threads.deferToThread(entered.wait, 30))
        begun.cancel()
        self.failureResultOf(begun, defer.CancelledError)
        release.set()
        # The one thread runs this after the write it had begun.
        self.assertEqual(await db.run("count", _count_users), 1)

    async def test_a_write_given_up_after_a_conflict_is_not_tried_again(self) -> None:
        """A transaction that rolled back on a lock conflict and whose caller gave up
        meanwhile stops there (a clean point): no new attempt, and no outage is told (it
        did not fail for good)."""
        db = await self.open_database_at(self.db.url, max_threads=1)
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        attempts: list[int] = []

        def conflicted(conn: Connection) -> None:
            attempts.append(1)
            _add_user(conn, f"try{len(attempts)}")
            entered.set()
            if not release.wait(30):
                raise AssertionError("never released")
            raise OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))

        given_up = db.run("conflicted", conflicted)
        self.assertTrue(await threads.deferToThread(entered.wait, 30))
        given_up.cancel()
        self.failureResultOf(given_up, defer.CancelledError)
        release.set()
        self.assertEqual(await db.run("count", _count_users), 0)
        self.assertEqual(attempts, [1])
        self.assertIsNone(db.outages.since)

    async def test_run_prepared_given_up_while_it_prepares_never_writes(self) -> None:
        """`run_prepared`'s write does not begin when its caller gave up while `prepare`
        ran."""
        db = await self.open_database_at(self.db.url, max_threads=1)
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        wrote: list[str] = []

        def prepare(read: Any) -> str:
            entered.set()
            if not release.wait(30):
                raise AssertionError("never released")
            return "prepared"

        def write(conn: Connection, name: str) -> int:
            wrote.append(name)
            return _add_user(conn, name)

        given_up = db.run_prepared("prepared", prepare, write)
        self.assertTrue(await threads.deferToThread(entered.wait, 30))
        given_up.cancel()
        self.failureResultOf(given_up, defer.CancelledError)
        release.set()
        self.assertEqual(await db.run("count", _count_users), 0)
        self.assertEqual(wrote, [])

    async def test_a_write_given_up_in_an_outage_does_not_end_it(self) -> None:
        """Outage accounting stays true: work dropped before it began is neither a failure
        nor a success of the store (a write dropped in an outage a write began does not end
        it); work that runs is counted as before."""
        full = _sqlite_error("database or disk is full", 13)
        db, holding, release = await self.held_pool()
        db.outages.failed(OperationalError("INSERT", {}, full), write=True)
        since = db.outages.since
        self.assertIsNotNone(since)
        given_up = db.run("add_user", _add_user, "late")
        given_up.cancel()
        self.failureResultOf(given_up, defer.CancelledError)
        release.set()
        await holding  # a read: it does not end an outage a write began
        # (on the one shared thread, after the write given up)
        self.assertEqual(await db.read_long("count", _count_users), 0)
        self.assertEqual(db.outages.since, since)
        await db.run("add_user", _add_user, "alive")
        self.assertIsNone(db.outages.since)

    async def test_an_errand_given_up_withdraws_only_what_has_not_begun(self) -> None:
        """An errand (work whose outcome its caller must know, an upload's row) given up
        while its first write runs: that write ends and the errand hears its outcome; the
        write it had queued never begins, nor does one it hands in later, each failing
        with CancelledError inside the errand; a run_prepared whose preparation had begun
        stops before its write. Store work outside the errand is left alone."""
        db = await self.open_database_at(self.db.url, max_threads=1)
        entered, release = threading.Event(), threading.Event()
        self.addCleanup(release.set)
        heard: list[object] = []

        def slow(conn: Connection, name: str) -> int:
            user = _add_user(conn, name)
            entered.set()
            if not release.wait(30):
                raise AssertionError("never released")
            return user

        async def work() -> None:
            first = db.run("first", slow, "first")
            queued = db.run("queued", _add_user, "queued")
            heard.append(await first)
            try:
                await queued
            except defer.CancelledError:
                heard.append("queued withdrawn")
            try:
                await db.run("later", _add_user, "later")
            except defer.CancelledError:
                heard.append("later withdrawn")
                raise

        errand = Errand()
        running = defer.Deferred.fromCoroutine(errand.run(work()))
        outside = db.run("outside", _add_user, "outside")
        self.assertTrue(await threads.deferToThread(entered.wait, 30))
        errand.give_up()
        self.assertFalse(running.called)
        release.set()
        with self.assertRaises(defer.CancelledError):
            await running
        await outside
        self.assertEqual(len(heard), 3)
        self.assertIsInstance(heard[0], int)
        self.assertEqual(heard[1:], ["queued withdrawn", "later withdrawn"])
        names = await db.read("names", lambda conn: sorted(
            conn.execute(select(users.c.username)).scalars()))
        self.assertEqual(names, ["first", "outside"])

        # A run_prepared begun: its outcome is that the write did not begin.
        entered.clear()
        release.clear()

        def prepare(read: Any) -> str:
            entered.set()
            if not release.wait(30):
                raise AssertionError("never released")
            return "prepared"

        async def prepared() -> int:
            return await db.run_prepared("prepared", prepare, _add_user)

        errand = Errand()
        writing = defer.Deferred.fromCoroutine(errand.run(prepared()))
        self.assertTrue(await threads.deferToThread(entered.wait, 30))
        errand.give_up()
        release.set()
        with self.assertRaises(defer.CancelledError):
            await writing
        self.assertEqual(await db.run("count", _count_users), 2)


class SQLiteDatabaseTests(DatabaseTestsMixin, TestCase):
    backend = "sqlite"
    lane_threads = 1

    async def test_pragmas_give_durable_concurrent_sqlite(self) -> None:
        """WAL, synchronous=FULL, a busy timeout, foreign keys and the checkpoint interval on
        every connection."""

        def pragmas(conn: Connection) -> dict[str, Any]:
            return {
                name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys",
                             "wal_autocheckpoint")
            }

        found = await self.db.read("pragmas", pragmas)
        self.assertEqual(
            found,
            {
                "journal_mode": "wal",
                "synchronous": 2,  # FULL
                "busy_timeout": SQLITE_BUSY_TIMEOUT_MS,
                "foreign_keys": 1,
                "wal_autocheckpoint": SQLITE_CHECKPOINT_PAGES,
            },
        )
        self.assertGreaterEqual(SQLITE_BUSY_TIMEOUT_MS, 5000)

    async def test_a_relaxed_write_commits_without_fsync_and_leaves_full_behind(self) -> None:
        """`run_relaxed` commits with synchronous=NORMAL (a later FULL commit fsyncs the
        WAL with it), then puts FULL back on the connection, also when the work fails; a
        failed relaxed write rolls back like any other."""

        def relaxed(conn: Connection, name: str) -> tuple[int, int]:
            return _add_user(conn, name), int(conn.exec_driver_sql("PRAGMA synchronous")
                                              .scalar_one())

        def level(conn: Connection) -> int:
            return int(conn.exec_driver_sql("PRAGMA synchronous").scalar_one())

        def failing(conn: Connection) -> None:
            _add_user(conn, "mallory")
            raise Boom()

        user_id, during = await self.db.run_relaxed("relaxed", relaxed, "alice")
        self.assertEqual(during, 1)  # NORMAL
        with self.assertRaises(Boom):
            await self.db.run_relaxed("relaxed", failing)
        for _ in range(3):  # whichever pooled connection comes next
            self.assertEqual(await self.db.read("level", level), 2)  # FULL

        def names(conn: Connection) -> list[str]:
            return list(conn.execute(select(users.c.username)).scalars().all())

        self.assertEqual(await self.db.read("names", names), ["alice"])
        self.assertIsInstance(user_id, int)

    async def test_a_relaxed_write_leaves_its_checkpoint_to_a_pool_thread(self) -> None:
        """A relaxed write commits with the checkpoint interval raised (the committing
        connection copies the WAL back only past RELAXED_CHECKPOINT_PAGES), puts it back,
        and a pool thread then checkpoints (PASSIVE) on a connection of its own: once for
        writes that come while one runs. An ordinary write leaves it to SQLite's own."""
        seen: list[tuple[str, str]] = []

        def trace(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.set_trace_callback(
                lambda sql: seen.append((threading.current_thread().name, sql)))

        self.db.engine.dispose()  # new connections from here on, traced
        event.listen(self.db.engine, "connect", trace)
        self.addCleanup(event.remove, self.db.engine, "connect", trace)

        def interval(conn: Connection) -> int:
            return int(conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one())

        def relaxed(conn: Connection, name: str) -> int:
            _add_user(conn, name)
            return interval(conn)

        def checkpoints() -> list[str]:
            return [thread for thread, sql in seen if sql == "PRAGMA wal_checkpoint(PASSIVE)"]

        self.assertEqual(await self.db.run_relaxed("relaxed", relaxed, "alice"),
                         RELAXED_CHECKPOINT_PAGES)
        deadline = get_reactor().seconds() + 10
        # Until the checkpoint has ended, not only run its PRAGMA: a write while it still
        # runs has it go round once more instead of calling the `_checkpoint` patched in
        # below (the wait for `started` then never ended, under load).
        while (not checkpoints() or self.db._checkpointing) and (
                get_reactor().seconds() < deadline):
            await sleep(0.01)
        self.assertFalse(self.db._checkpointing)
        self.assertEqual(len(checkpoints()), 1)
        self.assertTrue(checkpoints()[0].startswith("PoolThread-mailcore-db-"), checkpoints())
        self.assertNotIn("mailcore-db-read", checkpoints()[0])
        for _ in range(6):  # whichever pooled connection comes next
            self.assertEqual(await self.db.run("interval", interval), SQLITE_CHECKPOINT_PAGES)

        # Three relaxed writes while a checkpoint runs: one more checkpoint after it.
        seen.clear()
        started, release = threading.Event(), threading.Event()
        real = self.db._checkpoint

        def held() -> None:
            started.set()
            release.wait(10)
            real()

        self.patch(self.db, "_checkpoint", held)
        await self.db.run_relaxed("relaxed", relaxed, "bob")
        deadline = get_reactor().seconds() + 10
        while not started.is_set() and get_reactor().seconds() < deadline:
            await sleep(0.01)
        self.assertTrue(started.is_set())
        self.patch(self.db, "_checkpoint", real)
        for name in ("carol", "dave", "erin"):
            await self.db.run_relaxed("relaxed", relaxed, name)
        release.set()
        deadline = get_reactor().seconds() + 10
        while (len(checkpoints()) < 2 or self.db._checkpointing) and (
                get_reactor().seconds() < deadline):
            await sleep(0.01)
        self.assertEqual(len(checkpoints()), 2)

        seen.clear()
        await self.db.run("ordinary", _add_user, "frank")
        await sleep(0.05)
        self.assertEqual(checkpoints(), [])

    async def test_database_is_locked_is_retried(self) -> None:
        """A transaction that fails with "database is locked" runs again and commits."""
        attempts: list[int] = []

        def flaky(conn: Connection) -> str:
            attempts.append(1)
            _add_user(conn, f"try{len(attempts)}")
            if len(attempts) < 3:
                raise OperationalError(
                    "INSERT", {}, sqlite3.OperationalError("database is locked")
                )
            return "done"

        self.assertEqual(await self.db.run("flaky", flaky), "done")
        self.assertEqual(len(attempts), 3)
        names = await self.db.read(
            "names", lambda conn: list(conn.execute(select(users.c.username)).scalars())
        )
        self.assertEqual(names, ["try3"])  # the failed attempts left nothing behind

    async def test_a_locked_begin_is_retried(self) -> None:
        """BEGIN IMMEDIATE goes straight to the driver; its "database is locked" (busy
        timeout spent) is wrapped as SQLAlchemy would, so the transaction runs again."""
        real = sqlite3.connect(self.db.url.removeprefix("sqlite:///"), timeout=0)
        self.addCleanup(real.close)
        real.isolation_level = None
        real.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        attempts: list[int] = []

        def quick_timeout(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.execute("PRAGMA busy_timeout=0")

        event.listen(self.db.engine, "connect", quick_timeout)
        self.db.engine.dispose()  # new connections, with the short busy timeout

        def txn(conn: Connection) -> str:
            attempts.append(1)
            _add_user(conn, "late")
            return "done"

        d = self.db.run("locked", txn)
        await sleep(0.08)  # the first attempt(s) meet the lock
        real.execute("ROLLBACK")
        self.assertEqual(await d, "done")
        self.assertEqual(len(attempts), 1)  # it failed at BEGIN, before running txn

    async def test_other_operational_errors_are_not_retried(self) -> None:
        attempts: list[int] = []

        def broken(conn: Connection) -> None:
            attempts.append(1)
            conn.exec_driver_sql("SELECT * FROM no_such_table")

        with self.assertRaises(OperationalError):
            await self.db.run("broken", broken)
        self.assertEqual(len(attempts), 1)


class PostgresDatabaseTests(DatabaseTestsMixin, TestCase):
    backend = "postgresql"
    lane_threads = 2

    async def test_serialization_failure_is_retried(self) -> None:
        """SQLSTATE 40001 (serialization failure) rolls back and runs the function again."""
        attempts: list[int] = []

        def flaky(conn: Connection) -> int:
            attempts.append(1)
            _add_user(conn, f"try{len(attempts)}")
            if len(attempts) == 1:
                conn.exec_driver_sql(
                    "DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '40001'; END $$"
                )
            return len(attempts)

        self.assertEqual(await self.db.run("flaky", flaky), 2)
        names = await self.db.read(
            "names", lambda conn: list(conn.execute(select(users.c.username)).scalars())
        )
        self.assertEqual(names, ["try2"])

    async def test_reads_run_in_autocommit_and_writes_in_a_transaction(self) -> None:
        """A read sends no BEGIN or COMMIT (each statement is its own transaction, as in
        READ COMMITTED it has its own snapshot anyway); a write is one transaction."""
        from psycopg.pq import TransactionStatus

        def status(conn: Connection) -> tuple[bool, TransactionStatus]:
            conn.exec_driver_sql("SELECT 1")
            driver: Any = conn.connection.driver_connection
            return driver.autocommit, driver.info.transaction_status

        self.assertEqual(await self.db.read("status", status), (True, TransactionStatus.IDLE))
        self.assertEqual(await self.db.run("status", status),
                         (False, TransactionStatus.INTRANS))
        self.assertEqual(await self.db.read_long("status", status),
                         (False, TransactionStatus.INTRANS))

    async def test_sessions_run_in_utc_with_the_urls_own_options(self) -> None:
        """Whatever the server's or the URL's TimeZone, a session is in UTC: times come back
        in `datetime.UTC` and the server's day bounds are UTC's. The URL's other options
        still hold."""
        from sqlalchemy.engine import make_url

        from tests.support.db import database_url, open_database_at

        url = make_url(await database_url(self, "postgresql")).update_query_dict(
            {"options": "-c TimeZone=America/New_York -c statement_timeout=4321"})
        db = await open_database_at(self, url.render_as_string(hide_password=False))

        def settings(conn: Connection) -> tuple[Any, ...]:
            row = conn.exec_driver_sql(
                "SELECT current_setting('TimeZone'), current_setting('statement_timeout'),"
                " timestamptz '2026-01-02 03:04:05+00',"
                " date_trunc('day', timestamptz '2026-01-02 03:04:05+00')").one()
            return tuple(row)

        for way in (db.read, db.run):
            zone, timeout, moment, day = await way("settings", settings)
            self.assertEqual((zone, timeout), ("UTC", "4321ms"))
            self.assertIs(moment.tzinfo, datetime.UTC)
            self.assertEqual(moment, _NOW.replace(hour=3))
            self.assertEqual(day, datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC))

    async def test_tcp_connections_have_keepalives_and_a_user_timeout(self) -> None:
        """A connection had no TCP keepalive: with the server out of reach (a partition, no
        FIN or RST) a pool thread waited on its reply for the kernel's defaults, hours. The
        settings are libpq's, on our side of the connection (the server's SHOW
        tcp_keepalives_idle is its own socket's): read from psycopg's connection. A URL's
        own parameters win; a Unix-domain socket gets none (libpq has none there)."""
        from sqlalchemy.engine import make_url

        from tests.support import pg
        from tests.support.db import database_url, open_database_at

        def client(conn: Connection) -> tuple[str, dict[str, str]]:
            driver: Any = conn.connection.driver_connection
            info = driver.info
            return info.host, info.get_parameters()

        expected = {key: str(value) for key, value in PG_TCP_SETTINGS.items()}
        for way in (self.db.read, self.db.run):
            host, parameters = await way("client", client)
            self.assertFalse(host.startswith("/"), host)
            self.assertEqual({k: parameters.get(k) for k in expected}, expected)

        url = make_url(await database_url(self, "postgresql"))
        own = url.update_query_dict({"keepalives_idle": "5", "tcp_user_timeout": "7000"})
        db = await open_database_at(self, own.render_as_string(hide_password=False))
        _, parameters = await db.read("client", client)
        self.assertEqual({k: parameters.get(k) for k in expected},
                         {**expected, "keepalives_idle": "5", "tcp_user_timeout": "7000"})

        if pg._cluster is None:  # MAILCORE_TEST_PG_URL's server: its socket is unknown
            return
        local = url.set(host=None, port=None).update_query_dict(
            {"host": str(pg._cluster.sockets), "port": str(pg._cluster.port)})
        db = await open_database_at(self, local.render_as_string(hide_password=False))
        host, parameters = await db.read("client", client)
        self.assertEqual(host, str(pg._cluster.sockets))
        self.assertEqual({k: parameters.get(k) for k in expected},
                         dict.fromkeys(expected))
        self.assertEqual(parameters.get("connect_timeout"), "10")

    async def test_no_statement_is_jit_compiled_or_run_on_parallel_workers(self) -> None:
        """The store's sessions never JIT-compile a statement nor start parallel workers
        for it: PostgreSQL decides on both from a plan's estimated cost, and a generic plan
        prices a page's LIMIT $n at a tenth of the rows (a thread list's page of 0.4 ms
        was compiled for 20 ms on every run, a small account's page of 0.1 ms started two
        workers for 8 ms). The statements here are priced over any threshold; a session of
        the server's defaults compiles the first (else this server has no JIT to turn off,
        and the test says so) and runs the second on workers."""
        import psycopg
        from sqlalchemy.engine import make_url

        from tests.support.db import database_url, open_database_at

        url = make_url(await database_url(self, "postgresql"))
        db = await open_database_at(self, url.render_as_string(hide_password=False))
        costly = ("SET LOCAL jit_above_cost = 0",
                  "EXPLAIN ANALYZE SELECT sum(a * b) FROM generate_series(1, 10) AS a,"
                  " generate_series(1, 10) AS b")
        parallel = ("SET LOCAL parallel_setup_cost = 0; SET LOCAL parallel_tuple_cost = 0;"
                    " SET LOCAL min_parallel_table_scan_size = 0",
                    "EXPLAIN SELECT count(*) FROM plenty")

        def plans(conn: Connection) -> list[str]:
            found = []
            for setting, statement in (costly, parallel):
                for one in setting.split(";"):
                    conn.exec_driver_sql(one)
                found.append("\n".join(r[0] for r in conn.exec_driver_sql(statement)))
            return found

        def default_plans() -> list[str]:
            dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
            with psycopg.connect(dsn) as conn:
                conn.execute("CREATE TABLE plenty AS SELECT generate_series(1, 100000) AS n")
                conn.execute("ANALYZE plenty")
                conn.commit()
                found = []
                for setting, statement in (costly, parallel):
                    for one in setting.split(";"):
                        conn.execute(one.replace("SET LOCAL", "SET"))
                    found.append("\n".join(r[0] for r in conn.execute(statement)))
                return found

        jit, workers = await threads.deferToThread(default_plans)
        self.assertIn("Gather", workers)  # (a table of 100,000 rows, made there)
        for way in (db.read, db.run):
            ours = await way("plans", plans)
            self.assertNotIn("Gather", ours[1])
            self.assertNotIn("JIT:", ours[0])
        if "JIT:" not in jit:
            self.skipTest("this PostgreSQL server has no JIT (built without LLVM)")

    async def test_a_read_on_a_dead_kept_connection_runs_again_on_a_new_one(self) -> None:
        """The connections kept for reads are never pinged: when the server ends one (a
        restart, an administrator), the next read on it runs again on a new connection
        instead of failing."""

        def backend(conn: Connection) -> int:
            return int(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())

        def terminate(conn: Connection, pid: int) -> None:
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")

        pids = set(await defer.gatherResults([self.db.read("pid", backend) for _ in range(8)]))
        for pid in pids:
            await self.db.run("kill", terminate, pid)
        after = await defer.gatherResults([self.db.read("pid", backend) for _ in range(8)])
        self.assertFalse(pids & set(after))
        self.assertEqual(await self.db.read("count", _count_users), 0)


class ForTestsDatabaseTests(SynchronousTestCase):
    """`synchronous_database()`: each one a database of its own, at head, as migrated."""

    def test_each_is_a_migrated_database_of_its_own(self) -> None:
        from mailcore.store.migrate import at_newest_revision

        first, second = synchronous_database(), synchronous_database()
        with first.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO job_leases (name, owner, until) VALUES ('sweep', 'a', 1)")
        for db in (first, second):
            self.assertTrue(at_newest_revision(db.engine))
        with second.engine.connect() as conn:
            self.assertEqual(conn.exec_driver_sql("SELECT count(*) FROM job_leases").scalar(), 0)
            # What the migrations insert and create by hand is there too.
            names = {row[0] for row in conn.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type IN ('trigger', 'table')")}
            self.assertIn("messages_fts", names)
            self.assertIn("message_counts_insert", names)
            self.assertEqual(conn.exec_driver_sql("PRAGMA foreign_keys").scalar(), 1)
        with first.engine.connect() as conn:
            self.assertEqual(conn.exec_driver_sql("SELECT count(*) FROM job_leases").scalar(), 1)
            self.assertEqual(conn.exec_driver_sql(
                "SELECT value FROM billing_counters WHERE name = 'invoice_ref'").scalar(), 0)


class _QueuedCalls:
    """A reactor's callFromThread that keeps the calls until the test runs them."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []

    def callFromThread(self, f: Any, *args: Any) -> None:
        self.calls.append((f, args))

    def run(self) -> None:
        for f, args in self.calls:
            f(*args)


class WorkEndTests(SynchronousTestCase):
    """Work that ends on its pool thread while its caller gives up in the reactor."""

    def work(self, result: Any) -> tuple[_Work, _QueuedCalls]:
        reactor = _QueuedCalls()
        db = SimpleNamespace(_work_lock=threading.Lock(), _running=threading.local(),
                             _reactor=reactor)
        return _Work(db, lambda: result, (), {}), reactor  # type: ignore[arg-type]

    def test_a_cancel_between_the_end_and_its_answer_leaves_it_unheard(self) -> None:
        # The end was answered by the pool thread's check of given_up: a cancel in the
        # reactor after that check and before the answer ran made the answer fire a
        # Deferred that had failed already (AlreadyCalledError, logged unhandled).
        work, reactor = self.work(1)
        work.ended(True, work.run())
        work.d.cancel()
        reactor.run()
        self.failureResultOf(work.d, defer.CancelledError)
        failed, reactor = self.work(None)
        failed.ended(False, Failure(ValueError("lost")))
        failed.d.cancel()
        reactor.run()
        self.failureResultOf(failed.d, defer.CancelledError)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)  # logged, unheard

    def test_an_end_nobody_gave_up_is_answered(self) -> None:
        work, reactor = self.work(7)
        work.ended(True, work.run())
        self.assertNoResult(work.d)
        reactor.run()
        self.assertEqual(self.successResultOf(work.d), 7)
