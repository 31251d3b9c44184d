"""The Database: blocking SQLAlchemy work on a thread pool of its own, Deferreds outside.

Every piece of SQL in Mailcore is a function `thd_xxx(conn, ...)` (or a local `txn`) that
runs inside one transaction on a pool thread; callers get a Deferred with its result. The
reactor thread never waits on the database.

A caller that gives up (an HTTP request past `[web] reply_timeout` or whose client left, an
SMTP command past its deadline, a sync stopped: each cancels the Deferred it awaits) takes
its work back when it has not begun: cancelled while queued for a thread, it never begins.
Work already begun is not interrupted inside its transaction (what it does beside its SQL
need not be undone by an exception anywhere); it ends as it would have, unheard, except
that it stops at a clean point: no new attempt after a conflict that rolled it back, no
write after `run_prepared`'s preparation. A stalled store thus builds no backlog of dead
work (reads nobody waits for) to run before the live work once it answers again, and a
write whose client was told it failed does not commit after the client sent it again (a
draft twice). Work that must end known either way runs as an errand (`errands`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailcore.outages import StoreOutages, told
from mailcore.store import errands
from mailcore.store.engine import (
    PG_IDLE_IN_TRANSACTION_MS,
    SQLITE_CHECKPOINT_PAGES,
    WRITE_INTENT,
    is_sqlite,
    make_engine,
)

T = TypeVar("T")
B = TypeVar("B")
A = TypeVar("A")
R = TypeVar("R")
P = ParamSpec("P")


class Reader(Protocol):
    """Blocking: `fn(conn)` in a read transaction, on the calling pool thread."""

    def __call__(self, fn: Callable[[Connection], R], /) -> R: ...


log = Logger()

# SQLite: a relaxed write (a sync's batch) leaves copying the WAL back into the database (a
# checkpoint) to a pool thread, which does it on a connection of its own right after the
# commit (PASSIVE: it waits for no writer) while the next batch is written. The committing
# connection did it itself once the WAL held SQLITE_CHECKPOINT_PAGES: every third batch of a
# thousand messages or so, 120-270 ms of copying and fsync in the backup's one serial stage
# (a sixth of a quiet initial sync of 20,000). During a relaxed write the committing
# connection checkpoints only past this many pages: when the background falls behind, or
# readers keep the WAL from starting over.
RELAXED_CHECKPOINT_PAGES = 4 * SQLITE_CHECKPOINT_PAGES

# PostgreSQL SQLSTATEs after which the whole transaction may simply run again.
_RETRYABLE_SQLSTATES = {"40001", "40P01"}
MAX_ATTEMPTS = 5
# Logged (a warning) for a transaction that took over a second of wall time: how loaded
# the machine is as much as what the transaction did.
SLOW_TRANSACTION = "slow transaction {name}: {elapsed:.2f}s"


class StoreError(Exception):
    """A store operation failed in a way the caller can report."""


class _Work:
    """Work handed to a pool thread, from its hand-over to its end: `begun` once a thread
    starts it, `given_up` once its caller cancels its Deferred (before it begins: it never
    does), `stopping` once it is to stop at its next clean point (given up, or withdrawn
    with its errand after it began). They change under the Database's `_work_lock`."""

    __slots__ = ("args", "begun", "d", "db", "fn", "given_up", "kwargs", "stopping")

    def __init__(self, db: Database, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self.db = db
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.begun = False
        self.given_up = False
        self.stopping = False
        self.d: defer.Deferred[Any] = defer.Deferred(self.give_up)

    def run(self) -> Any:
        """On a pool thread: the work, unless its caller gave it up first."""
        db = self.db
        with db._work_lock:
            if self.given_up:
                return _NEVER_BEGUN
            self.begun = True
        db._running.work = self
        try:
            return self.fn(*self.args, **self.kwargs)
        finally:
            db._running.work = None

    def ended(self, ok: bool, result: Any) -> None:
        """On the pool thread, after `run`: its Deferred fires in the reactor thread."""
        if result is not _NEVER_BEGUN:
            self.db._reactor.callFromThread(self._fire, ok, result)

    def _fire(self, ok: bool, result: Any) -> None:
        """In the reactor thread: fire the Deferred, unless the caller gave up (it failed
        with CancelledError then, maybe after the work ended and before this ran: so the
        check is made here, where a cancel happens, not on the pool thread)."""
        if self.d.called:
            if not ok:
                _unheard(result)
            return
        if ok:
            self.d.callback(result)
        else:
            self.d.errback(result)

    def give_up(self, _: object) -> None:
        """Its Deferred was cancelled: a thread will not begin it, or will stop it at the
        next clean point (`Database._given_up`)."""
        with self.db._work_lock:
            self.given_up = self.stopping = True

    def withdraw(self) -> None:
        """For an errand given up: drop the work if it has not begun; else it stops at its
        next clean point (CancelledError), or ends, and its Deferred fires with that. The
        flags are set here, under the lock with the check: the Deferred fails as its
        cancel() would fail it, without its canceller (`give_up`) setting them again."""
        with self.db._work_lock:
            self.stopping = True
            if self.begun or self.given_up:  # (given up: its Deferred failed then)
                return
            self.given_up = True
        self.d.errback(Failure(defer.CancelledError()))


def _unheard(failure: Failure) -> None:
    """Work its caller gave up on failed: nobody hears it, so the log does, unless it is its
    stop at a clean point or a store outage (whose own lines tell it)."""
    if failure.check(defer.CancelledError) or (
            failure.value is not None and told(failure.value)):
        return
    log.failure("store work its caller gave up on failed", failure)


# What a pool thread hands back for work given up before it began (nobody to tell).
_NEVER_BEGUN: Any = object()


def _retryable(error: DBAPIError) -> bool:
    orig = getattr(error, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in _RETRYABLE_SQLSTATES:
        return True
    return isinstance(error, OperationalError) and "database is locked" in str(orig)


class Database:
    """One database: an engine, a thread pool, and transactions run as named functions.

    With `synchronous=True` (tests only) the work runs on the calling thread and the
    Deferred has already fired when `run` returns; with the in-memory SQLite URL this gives
    unit tests a real schema without threads.
    """

    def __init__(
        self,
        url: str,
        reactor: IReactorFromThreads,
        *,
        max_threads: int = 4,
        read_threads: int | None = None,
        synchronous: bool = False,
        node: str = "",
        idle_in_transaction_timeout: float = PG_IDLE_IN_TRANSACTION_MS / 1000,
    ) -> None:
        self.url = url
        # PostgreSQL: how long a transaction may wait on this node ([store]
        # idle_in_transaction_timeout; also mailcore.store.stuck's bound).
        self.idle_in_transaction_timeout = idle_in_transaction_timeout
        self.is_sqlite = is_sqlite(url)
        self._reactor = reactor
        self._synchronous = synchronous
        if read_threads is None:
            # Short reads keep a lane of their own threads, so that they never queue behind
            # writes and long reads. SQLite: one thread; several spent more time handing
            # Python's lock round than reading. PostgreSQL: two; with four, the threads'
            # wake-ups and lock hand-overs cost more than the parallel statements gave (a
            # million-message list at 16 connections, two against four, 4 alternating
            # rounds: page 18,000 933 -> 1,069 req/s, the first page 1,124 -> 1,173).
            read_threads = 1 if self.is_sqlite else 2
        self.engine: Engine = make_engine(
            # A connection for each shared thread, one held by each thread of the read
            # lane, one spare.
            url, pool_size=max_threads + read_threads + 1, node=node,
            idle_in_transaction_ms=round(idle_in_transaction_timeout * 1000))
        self._pool: ThreadPool | None = None
        self._read_pool: ThreadPool | None = None
        if not synchronous:
            self._pool = ThreadPool(minthreads=1, maxthreads=max_threads, name="mailcore-db")
            self._read_pool = ThreadPool(
                minthreads=1, maxthreads=read_threads, name="mailcore-db-read")
        # Each thread that reads keeps one connection between its reads (a pool checkout,
        # reset and, on PostgreSQL, ping per read was a tenth of a list page's time).
        self._held = threading.local()
        self._held_conns: list[Connection] = []
        self._held_lock = threading.Lock()
        # The log's two lines of an outage (mailcore.outages), on the reactor's clock.
        self.outages = StoreOutages(getattr(reactor, "seconds", time.time))
        # The background checkpoint after relaxed writes: running, and asked again meanwhile.
        self._checkpoint_lock = threading.Lock()
        self._checkpointing = False
        self._checkpoint_again = False
        # Which work is queued or begun, and which was given up (_Work); the work each pool
        # thread runs, for the clean points where work given up stops (`_given_up`).
        self._work_lock = threading.Lock()
        self._running = threading.local()

    def _pools(self) -> list[ThreadPool]:
        """The thread pools, the read lane first."""
        return [p for p in [self._read_pool, self._pool] if p is not None]

    @property
    def threaded(self) -> bool:
        """Whether work runs on the pool (False: synchronously, in tests)."""
        return self._pool is not None

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the thread pool and bring the schema to the newest revision."""
        for pool in self._pools():
            if not pool.started:
                pool.start()
        await self._defer(self.migrate_blocking)

    def migrate_blocking(self) -> None:
        """Run Alembic to head. Blocks: call through `open()` or from a thread."""
        from mailcore.store.migrate import upgrade_to_head

        upgrade_to_head(self.engine)

    async def close(self) -> None:
        """Finish queued work, stop the pool's threads and release connections."""
        for pool in self._pools():
            if pool.started:
                await self._defer_on(pool, lambda: None)
                pool.stop()
        with self._held_lock:
            held, self._held_conns = self._held_conns, []
        for conn in held:  # the threads that read have stopped
            conn.close()
        self.engine.dispose()

    # -- running work ---------------------------------------------------------------------

    def run(
        self,
        name: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> defer.Deferred[T]:
        """Run `fn(conn, *args, **kwargs)` in one write transaction on the pool.

        `name` says what the transaction is for; it appears in logs and slow-query reports.
        Lock conflicts and serialization failures roll back and run the function again.
        """
        return self._defer(self._transaction, name, True, fn, *args, **kwargs)

    def run_prepared(
        self,
        name: str,
        prepare: Callable[[Reader], A],
        fn: Callable[[Connection, A], T],
    ) -> defer.Deferred[T]:
        """Like `run` of `fn(conn, prepare(read))`, with `prepare` run first on the same
        pool thread, outside the write transaction: work it does (building a message)
        holds no write lock, and costs no trip through the reactor. `read(f)` runs
        `f(conn)` in a read transaction and returns its result. `fn` must check again what
        it relies on of `prepare`'s reads: another write may come between them."""

        def read(f: Callable[[Connection], R]) -> R:
            return self._transaction(name, False, f)

        def work() -> T:
            prepared = prepare(read)
            if self._given_up():  # its caller gave up meanwhile: the write never begins
                raise defer.CancelledError()
            return self._transaction(name, True, fn, prepared)

        return self._defer(work)

    def prepare(self, name: str, prepare: Callable[[Reader], A]) -> defer.Deferred[A]:
        """`prepare(read)` alone on the pool, outside any write transaction (`run_prepared`
        without its write): for a write that commits elsewhere, a rider of the spool's
        group commit (`Spool.ride`), which must check again what it relies on of it."""

        def read(f: Callable[[Connection], R]) -> R:
            return self._transaction(name, False, f)

        return self._defer(prepare, read)

    def run_relaxed(
        self,
        name: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> defer.Deferred[T]:
        """Like `run`, for a write whose durability a later `run` vouches for. On SQLite the
        commit is not fsynced (`synchronous=NORMAL` for this transaction): it survives a
        crash of the process, and the next ordinary commit (FULL) fsyncs the WAL with it,
        so after that commit it survives a crash of the machine too. The caller must not
        acknowledge the work before such a commit: a sync stores its batches this way and
        says "done" with the folder state it saves after them. The WAL it wrote is copied
        into the database by a pool thread after the commit, not by the commit (see
        RELAXED_CHECKPOINT_PAGES). PostgreSQL: same as `run`.
        """
        return self._defer(self._transaction, name, True, fn, *args, relaxed=True, **kwargs)

    def read(
        self,
        name: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> defer.Deferred[T]:
        """Like `run`, for work that only reads (no write lock is taken on SQLite); it runs
        on the read lane."""
        if self._read_pool is None:  # synchronous (tests): no threads to keep one for
            return self._defer_on(None, self._transaction, name, False, fn, *args, **kwargs)
        return self._defer_on(self._read_pool, self._held_read, name, fn, *args, **kwargs)

    def read_long(
        self,
        name: str,
        fn: Callable[Concatenate[Connection, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> defer.Deferred[T]:
        """Like `read`, for a read that spends long inside the database (a full-text
        search): it runs on the shared pool, where such reads run side by side on several
        cores (SQLite steps without Python's lock) and never hold up the short reads
        queued on the read lane."""
        return self._defer(self._transaction, name, False, fn, *args, **kwargs)

    def stream(
        self,
        name: str,
        take: Callable[[], B | None],
        fn: Callable[[Connection, B], T],
        done: Callable[[B, T | Failure], None],
    ) -> defer.Deferred[None]:
        """Run write transactions back to back on one pool thread, without a trip through
        the reactor between them: `take()` (called on the pool thread; it must be safe
        there, and may wait there a while for work) gives the next batch, `fn(conn, batch)`
        runs in its own transaction, and `done(batch, result)` is called in the reactor
        thread after each commit (with a Failure when the transaction failed, which also
        ends the stream). The stream ends when `take()` returns nothing; the Deferred fires
        after the last `done`. When no connection can be had (the database server is down),
        the first batch gets that Failure, as if its transaction had failed.

        For a write lane such as the spool's group commit: the next group starts while the
        reactor is still answering the previous one.
        """

        def loop() -> None:
            # One connection for the whole stream: no pool checkout and reset per group.
            try:
                connection = self.engine.connect()
            except Exception as e:
                self.outages.failed(e, write=True)
                # Its callers are answered (the SMTP client gets its 451 at once) instead
                # of waiting, while a new stream tries again and again, for the database.
                failure = Failure()
                batch = take()
                if batch:
                    self._in_reactor(done, batch, failure)
                return
            with connection as conn:
                conn.info[WRITE_INTENT] = True
                while True:
                    batch = take()
                    if not batch:
                        return

                    def once(batch: B = batch) -> T:
                        with conn.begin():
                            return fn(conn, batch)

                    try:
                        result = self._retrying(name, True, once)
                    except Exception:
                        self._in_reactor(done, batch, Failure())
                        return
                    self._in_reactor(done, batch, result)

        return self._defer(loop)

    def _in_reactor(self, fn: Callable[..., object], *args: Any) -> None:
        if self._pool is None:
            fn(*args)
        else:
            self._reactor.callFromThread(fn, *args)

    def _defer(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> defer.Deferred[T]:
        return self._defer_on(self._pool, fn, *args, **kwargs)

    def _defer_on(self, pool: ThreadPool | None, fn: Callable[..., T], *args: Any,
                  **kwargs: Any) -> defer.Deferred[T]:
        """`fn(*args, **kwargs)` on `pool` (None: here and now, synchronous). Cancelling
        the Deferred before a thread begins the work drops it: it never begins (see the
        module docstring); after, the work ends unheard."""
        if pool is None:
            try:
                return defer.succeed(fn(*args, **kwargs))
            except BaseException:
                return defer.fail()
        if pool.joined:
            # A stopped ThreadPool drops new work silently: the Deferred would never fire.
            return defer.fail(StoreError("the database is closed"))

        def start() -> tuple[defer.Deferred[T], Callable[[], None]]:
            work = _Work(self, fn, args, kwargs)
            pool.callInThreadWithCallback(work.ended, work.run)
            return work.d, work.withdraw

        return errands.hand_in(start)

    def _given_up(self) -> bool:
        """Blocking, on a pool thread: whether the caller of the work this thread runs gave
        it up (it then stops at the next clean point, with CancelledError)."""
        work: _Work | None = getattr(self._running, "work", None)
        return work is not None and work.stopping

    def _transaction(
        self, name: str, write: bool, fn: Callable[..., T], *args: Any,
        relaxed: bool = False, **kwargs: Any,
    ) -> T:
        """Blocking: one transaction, retried on lock conflicts. Runs on a pool thread."""
        relaxed = relaxed and self.engine.dialect.name == "sqlite"
        behind = relaxed and self._pool is not None  # its checkpoint on a pool thread

        def once() -> T:
            with self.engine.connect() as conn:
                conn.info[WRITE_INTENT] = write
                if not relaxed:
                    with conn.begin():
                        return fn(conn, *args, **kwargs)
                # The level can change only between transactions; it is put back before
                # the connection returns to the pool, as is the checkpoint interval.
                driver: Any = conn.connection.driver_connection
                driver.execute("PRAGMA synchronous=NORMAL")
                if behind:
                    driver.execute(f"PRAGMA wal_autocheckpoint={RELAXED_CHECKPOINT_PAGES}")
                try:
                    with conn.begin():
                        return fn(conn, *args, **kwargs)
                finally:
                    driver.execute("PRAGMA synchronous=FULL")
                    if behind:
                        driver.execute(f"PRAGMA wal_autocheckpoint={SQLITE_CHECKPOINT_PAGES}")

        result = self._retrying(name, write, once)
        if behind:
            self._checkpoint_soon()
        return result

    def _checkpoint_soon(self) -> None:
        """A PASSIVE checkpoint on a pool thread (see RELAXED_CHECKPOINT_PAGES); one at a
        time: asked while one runs, it runs once more after it."""
        with self._checkpoint_lock:
            if self._checkpointing:
                self._checkpoint_again = True
                return
            self._checkpointing = True
        assert self._pool is not None
        self._pool.callInThread(self._checkpoint)

    def _checkpoint(self) -> None:
        """Blocking, on a pool thread: copy what the WAL holds into the database, as far as
        the readers allow, without waiting for any writer (SQLite's wal_checkpoint(PASSIVE),
        fsyncs included: the connection is at synchronous=FULL)."""
        while True:
            try:
                with self.engine.connect() as conn:
                    driver: Any = conn.connection.driver_connection
                    driver.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except Exception:
                # Nothing is lost: the WAL keeps it, and the next checkpoint copies it.
                log.failure("SQLite checkpoint after a relaxed write failed")
            with self._checkpoint_lock:
                if not self._checkpoint_again:
                    self._checkpointing = False
                    return
                self._checkpoint_again = False

    def _held_read(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Blocking: `_transaction` of a read, on the connection this thread keeps for its
        reads (made on its first read, never pinged: a read that finds it dead, say after
        PostgreSQL restarted, runs once more on a new one; in autocommit on PostgreSQL)."""

        def once() -> T:
            conn = self._held_connection(renew=False)
            try:
                with conn.begin():
                    return fn(conn, *args, **kwargs)
            except DBAPIError as e:
                if not e.connection_invalidated:
                    raise
            conn = self._held_connection(renew=True)
            with conn.begin():
                return fn(conn, *args, **kwargs)

        return self._retrying(name, False, once)

    def _held_connection(self, renew: bool) -> Connection:
        """This thread's read connection (a new one when there is none, it is no longer
        usable, or `renew`)."""
        conn: Connection | None = getattr(self._held, "conn", None)
        if conn is not None and not (renew or conn.closed or conn.invalidated):
            return conn
        fresh = self.engine.connect()
        if not self.is_sqlite:
            # PostgreSQL: no BEGIN and COMMIT around a read, two of a list page's four round
            # trips. Nothing is given up: in READ COMMITTED, PostgreSQL's default and ours,
            # each statement takes its own snapshot inside a transaction too. (The pool
            # puts the connection back to its default level when it is returned.)
            fresh = fresh.execution_options(isolation_level="AUTOCOMMIT")
        fresh.info[WRITE_INTENT] = False
        with self._held_lock:
            if conn is not None and conn in self._held_conns:
                self._held_conns.remove(conn)
                conn.close()
            self._held_conns.append(fresh)
        self._held.conn = fresh
        return fresh

    def _retrying(self, name: str, write: bool, once: Callable[[], T]) -> T:
        """Blocking: `once()` (one transaction, a `write` one or a read), run again after
        lock conflicts and serialization failures; slow ones are logged, and how it ended
        is told to `outages`."""
        delay = 0.05
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if attempt > 1 and self._given_up():
                # The last attempt rolled back and its caller gave up: no new attempt (and
                # no outage told: the transaction did not fail for good).
                raise defer.CancelledError()
            started = time.monotonic()
            try:
                result = once()
                elapsed = time.monotonic() - started
                if elapsed > 1.0:
                    log.warn(SLOW_TRANSACTION, name=name, elapsed=elapsed)
                self.outages.succeeded(write)
                return result
            except DBAPIError as e:
                if attempt == MAX_ATTEMPTS or not _retryable(e):
                    self.outages.failed(e, write)
                    raise
                log.info(
                    "transaction {name} conflicted (attempt {attempt}); retrying",
                    name=name,
                    attempt=attempt,
                )
                time.sleep(delay)  # on a pool thread, never the reactor
                delay *= 2
        raise AssertionError("unreachable")
