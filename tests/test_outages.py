"""Which failures are a resource out of room or out of reach (mailcore.outages): real
errors of SQLite, the OS and a PostgreSQL connection that cannot be made."""

from __future__ import annotations

import errno

from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError
from twisted.trial.unittest import SynchronousTestCase

from mailcore.outages import DATABASE_BUSY, DATABASE_DOWN, NO_ROOM, outage
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
