"""Which failures are a resource out of room or out of reach (mailcore.outages): real
errors of SQLite, the OS and a PostgreSQL connection that cannot be made."""

from __future__ import annotations

import errno
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from mailcore.gateway.domains import DomainService
from mailcore.identity.service import CredentialSweeper, Identity
from mailcore.outages import (
    DATABASE_BUSY,
    DATABASE_DOWN,
    NO_ROOM,
    StoreOutages,
    log_failure,
    outage,
    told,
)
from mailcore.periodic import PeriodicService
from mailcore.ratelimits import BucketSweeper, SharedBuckets
from mailcore.store import Database
from mailcore.store.dbclock import ClockFollower, DatabaseTime
from mailcore.workers import CpuPool
from tests.support.db import copy_migrated_sqlite_blocking
from tests.support.logs import load_noise, logged
from tests.support.servers import free_port


def _error_of(engine_url: str, *statements: str) -> DBAPIError:
    engine = create_engine(engine_url)
    try:
        with engine.connect() as conn:
            for statement in statements:
                conn.execute(text(statement))
    except DBAPIError as e:
        return e
    finally:
        engine.dispose()
    raise AssertionError("no error")


class OutageTests(SynchronousTestCase):

    def test_sqlite_out_of_room_is_no_room(self) -> None:
        error = _error_of(
            "sqlite://",
            "PRAGMA max_page_count = 2",
            "CREATE TABLE t (x TEXT)",
            "INSERT INTO t VALUES (printf('%.10000c', 'x'))",
        )
        self.assertIn("database or disk is full", str(error))
        self.assertIs(outage(error), NO_ROOM)

    def test_a_full_disk_is_no_room(self) -> None:
        self.assertIs(outage(OSError(errno.ENOSPC, "No space left on device")), NO_ROOM)
        self.assertIs(outage(OSError(errno.EDQUOT, "Disk quota exceeded")), NO_ROOM)

    def test_a_database_server_that_is_not_there_is_down(self) -> None:
        port = free_port()  # nothing listens there
        error = _error_of(f"postgresql+psycopg://mc@127.0.0.1:{port}/mc", "SELECT 1")
        self.assertIs(outage(error), DATABASE_DOWN)

    def test_a_locked_sqlite_database_is_busy(self) -> None:
        error = DBAPIError("BEGIN", {}, _sqlite_error("database is locked", 5))
        self.assertIs(outage(error), DATABASE_BUSY)

    def test_other_errors_are_not_outages(self) -> None:
        self.assertIsNone(outage(OSError(errno.EACCES, "Permission denied")))
        self.assertIsNone(outage(RuntimeError("a bug")))
        self.assertIsNone(outage(ValueError("bad")))
        error = _error_of("sqlite://", "CREATE TABLE t (x INTEGER PRIMARY KEY)",
                          "INSERT INTO t VALUES (1)", "INSERT INTO t VALUES (1)")
        self.assertIsInstance(error, IntegrityError)
        self.assertIsNone(outage(error))
        self.assertIsNone(outage(_error_of("sqlite://", "SELECT * FROM missing")))

    def test_an_error_raised_from_an_outage_is_that_outage(self) -> None:
        """What a caller gets for work an outage stopped (the spool's SpoolError of a
        failed group commit) carries it as its cause, and is that outage; an error raised
        from a bug is not one."""
        from mailcore.queue.spool import SpoolError

        full = _error_of("sqlite://", "PRAGMA max_page_count = 2", "CREATE TABLE t (x TEXT)",
                         "INSERT INTO t VALUES (printf('%.10000c', 'x'))")
        for cause, expected in ((full, NO_ROOM), (RuntimeError("a bug"), None)):
            try:
                try:
                    raise cause
                except Exception as e:
                    raise SpoolError("commit failed") from e
            except SpoolError as e:
                self.assertIs(outage(e), expected)


def _sqlite_error(message: str, code: int) -> Exception:
    import sqlite3

    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code
    return error


class MailApiRefusalTests(SynchronousTestCase):
    """The Mail API answers its own 500 for a failed write (web.mailapi.refusals): a full
    disk while an attachment is streamed to disk was that 500 and a traceback."""

    def test_a_full_disk_while_storing_is_507(self) -> None:
        from web.errors import ApiError
        from web.mailapi import refusals

        with self.assertRaises(ApiError) as caught, refusals("storing a Mail API mail failed"):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.assertEqual(caught.exception.status, 507)
        self.assertEqual(caught.exception.headers, {"Retry-After": "30"})
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_bug_is_still_a_logged_500(self) -> None:
        from web.errors import ApiError
        from web.mailapi import refusals

        with self.assertRaises(ApiError) as caught, refusals("storing a Mail API mail failed"):
            raise RuntimeError("a bug")
        self.assertEqual(caught.exception.status, 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class StoreOutageLogTests(SynchronousTestCase):
    """A store out of reach is one line when it begins and one when it ends, however many
    periodic jobs fail of it meanwhile (each logged a failure on each of its runs: with
    several jobs, up to 10 lines a minute each, after which the repeated-line limiter
    summed them up)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.home = Path(self.mktemp())
        self.home.mkdir()
        copy_migrated_sqlite_blocking(self.home / "mailcore.sqlite")
        self.db = Database(f"sqlite:///{self.home / 'mailcore.sqlite'}",
                           self.clock, synchronous=True)  # type: ignore[arg-type]
        self.addCleanup(self.db.engine.dispose)
        self.db.migrate_blocking()  # at head already: a copy of the migrated template
        self.warnings = logged(self, lambda e: e.get("log_level") >= LogLevel.warn
                               and not load_noise(e))
        self.infos = logged(self, lambda e: "store" in e.get("log_format", "")
                            and not load_noise(e))
        self.lines = logged(self, lambda e: e.get("log_level") >= LogLevel.info
                            and not load_noise(e))

    def jobs(self) -> list[PeriodicService]:
        identity = Identity(self.db, self.clock, CpuPool.for_tests())
        return [BucketSweeper(SharedBuckets(self.db, self.clock), every=5),
                CredentialSweeper(identity, self.clock, every=5),
                ClockFollower(DatabaseTime(self.clock), self.db),
                DomainService(self.db, self.clock, poll_interval=5)]

    def outage(self) -> None:
        """The store's directory goes away (an unmounted volume): no connection opens."""
        self.home.rename(self.home.with_name("away"))
        self.db.engine.dispose()

    def back(self) -> None:
        self.home.with_name("away").rename(self.home)

    def test_an_outage_is_a_line_when_it_begins_and_one_when_it_ends(self) -> None:
        jobs = self.jobs()
        for job in jobs:
            job.startService()
            self.addCleanup(job.stopService)
        self.assertEqual(self.warnings, [])
        before = len(self.lines)
        self.outage()
        for _ in range(24):  # two minutes
            self.clock.advance(5)
        self.assertEqual(len(self.warnings), 1, self.warnings)
        self.assertEqual(
            self.warnings[0],
            "store unavailable since 2023-11-14T22:13:25+0000: the database cannot be reached "
            "(OperationalError: unable to open database file); until it is back, the periodic "
            "jobs that need it fail without a line each")
        self.assertIsNotNone(self.db.outages.since)
        self.back()
        self.clock.advance(5)
        self.assertRegex(self.infos[-1],
                         r"^store reachable again after 120 s, [1-9][0-9]* operations failed$")
        self.assertIsNone(self.db.outages.since)
        # Nothing else: no job's failure, nor the domain snapshot's first and last lines.
        self.assertEqual(self.lines[before:], [self.warnings[0], self.infos[-1]])
        self.assertEqual(len(self.warnings), 1)
        # The next outage is told again.
        self.outage()
        self.clock.advance(5)
        self.assertEqual(len(self.warnings), 2)
        self.back()

    def test_a_failure_that_is_no_outage_is_still_logged_by_its_job(self) -> None:
        outages = StoreOutages(self.clock.seconds)
        bug = RuntimeError("a bug")
        outages.failed(bug, write=True)
        try:
            raise bug
        except RuntimeError:
            log_failure(Logger(), "the job failed")
        self.assertEqual(self.warnings, ["the job failed"])
        self.flushLoggedErrors(RuntimeError)
        self.assertIsNone(outages.since)

    def test_an_outage_a_write_began_ends_with_a_write(self) -> None:
        """No room left, or the write lock held elsewhere: reads still work, and do not end
        it (a line pair per run of the jobs that read)."""
        outages = StoreOutages(self.clock.seconds)
        full = _error_of("sqlite://", "PRAGMA max_page_count = 2", "CREATE TABLE t (x TEXT)",
                         "INSERT INTO t VALUES (printf('%.10000c', 'x'))")
        outages.failed(full, write=True)
        self.assertTrue(told(full))
        self.clock.advance(30)
        outages.succeeded(write=False)
        self.assertIsNotNone(outages.since)
        outages.succeeded(write=True)
        self.assertIsNone(outages.since)
        self.assertEqual(self.infos[-1], "store reachable again after 30 s, 1 operation failed")
        # One a read began ends with any transaction that commits.
        outages.failed(full, write=False)
        outages.succeeded(write=False)
        self.assertIsNone(outages.since)

    def test_the_end_of_an_outage_says_how_many_operations_failed_of_it(self) -> None:
        """Each transaction that failed of the outage (after its retries) is counted once;
        a failure that is no outage is not, and the next outage counts from one again."""
        outages = StoreOutages(self.clock.seconds)
        gone = _error_of(f"sqlite:///{self.home / 'missing' / 'x.sqlite'}", "SELECT 1")
        for write in (False, True, False):
            outages.failed(gone, write)
        outages.failed(RuntimeError("a bug"), write=False)
        self.clock.advance(7)
        outages.succeeded(write=False)
        self.assertEqual(self.infos[-1], "store reachable again after 7 s, 3 operations failed")
        outages.failed(gone, write=False)
        self.clock.advance(2)
        outages.succeeded(write=True)
        self.assertEqual(self.infos[-1], "store reachable again after 2 s, 1 operation failed")
