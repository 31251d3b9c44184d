"""Which failures are a resource running out or away rather than a bug: a full disk (the
files directories, SQLite's file) or a database server that cannot be reached. The HTTP APIs
answer those 507 or 503 with Retry-After, a line in the log without a traceback, instead of a
500 with a traceback per request; they end when the resource is back (nothing to restart).

While the store is out of reach (or room), every job that runs every few seconds fails of it
on each run. `StoreOutages`, which the Database tells of each transaction's end, logs one
line when the outage begins (its cause, since when) and one when a transaction succeeds
again (after how long, and how many transactions failed of it meanwhile); a job logs its
failure with `log_failure`, which leaves out the failures those two lines already tell,
rather than one line per job and run.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import DBAPIError, OperationalError
from twisted.logger import Logger, formatTime, timeFormatRFC3339
from twisted.python.failure import Failure

from mailcore.text import first_line

log = Logger()

# SQLite's primary result codes (the low byte of an extended code).
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_IOERR = 10
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
# PostgreSQL SQLSTATE: class 08 (connection exception), 53100 (disk full), 57P01-57P03
# (the server shuts down, crashed, cannot take connections yet).
_PG_DISK_FULL = "53100"
_PG_GOING_AWAY = frozenset({"57P01", "57P02", "57P03"})
# How far down a chain of causes `outage` looks (a chain may loop).
_MOST_CAUSES = 8
# Set on an error that `StoreOutages` logged as (part of) an outage.
_TOLD = "mailcore_outage_told"


@dataclass(frozen=True)
class Outage:
    """A resource that is missing: `full` (no room left: 507), else unavailable (503)."""

    full: bool
    what: str


NO_ROOM = Outage(True, "no room left on the server's storage")
DATABASE_DOWN = Outage(False, "the database cannot be reached")
DATABASE_BUSY = Outage(False, "the database is busy")
# A request whose reply had not begun at `[web] reply_timeout` (web.deadline): what it waits
# on that long is the store, a database server that is frozen or hung.
DATABASE_SLOW = Outage(False, "the database did not answer in time")


def outage(error: BaseException) -> Outage | None:
    """The outage `error` shows, or None when it is something else. An error raised from an
    outage (its `__cause__`: the spool's SpoolError of a group commit that failed for one)
    shows that outage."""
    cause: BaseException | None = error
    for _ in range(_MOST_CAUSES):
        if cause is None:
            break
        found = _outage(cause)
        if found is not None:
            return found
        cause = cause.__cause__
    return None


def _outage(error: BaseException) -> Outage | None:
    if isinstance(error, OSError):
        return NO_ROOM if error.errno in (errno.ENOSPC, errno.EDQUOT) else None
    if not isinstance(error, DBAPIError):
        return None
    orig = error.orig
    code = getattr(orig, "sqlite_errorcode", None)
    if isinstance(code, int):
        primary = code & 0xFF
        if primary == _SQLITE_FULL:
            return NO_ROOM
        if primary in (_SQLITE_BUSY, _SQLITE_LOCKED):
            return DATABASE_BUSY
        if primary in (_SQLITE_IOERR, _SQLITE_CANTOPEN):
            return DATABASE_DOWN
        return None
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate == _PG_DISK_FULL:
        return NO_ROOM
    if error.connection_invalidated or (
        isinstance(sqlstate, str) and (sqlstate.startswith("08") or sqlstate in _PG_GOING_AWAY)
    ):
        return DATABASE_DOWN
    if sqlstate is None and isinstance(error, OperationalError):
        # psycopg's "connection failed" (the server refused or is not there) has no SQLSTATE
        return DATABASE_DOWN
    return None


def describe(error: BaseException) -> str:
    """`error` as one line: its type and the first line of its message (a database error's
    first, not the SQL and parameters that follow)."""
    cause = getattr(error, "orig", None) or error
    line = first_line(str(cause))
    return f"{type(cause).__name__}: {line}" if line else type(cause).__name__


class StoreOutages:
    """The store's outages as the log tells them (see the module docstring). The Database
    calls `failed` with each transaction's last error and `succeeded` after each one that
    committed, from its pool threads. An outage that a write began (no room left, the
    write lock held elsewhere, while reads still work) ends only when a write succeeds."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._lock = threading.Lock()
        self._since: float | None = None
        self._by_write = False
        self._failures = 0  # transactions that failed of the outage in course

    @property
    def since(self) -> float | None:
        """When the outage in course began; None when there is none."""
        return self._since

    def failed(self, error: BaseException, write: bool) -> None:
        """A transaction (a `write` one or a read) failed for good with `error`."""
        found = outage(error)
        if found is None:
            return
        with self._lock:
            began = self._since is None
            if began:
                self._since = self._now()
                self._by_write = write
                self._failures = 0
            self._failures += 1
            since = self._since
        if began:
            log.warn("store unavailable since {since}: {what} ({cause}); until it is back, "
                     "the periodic jobs that need it fail without a line each",
                     since=formatTime(since, timeFormatRFC3339), what=found.what,
                     cause=describe(error))
        try:
            setattr(error, _TOLD, True)
        except AttributeError:  # pragma: no cover - an exception type without a __dict__
            pass

    def succeeded(self, write: bool) -> None:
        """A transaction (a `write` one or a read) committed. The line that ends an
        outage says how many transactions failed of it (each once, after its retries)."""
        if self._since is None:  # the usual case, without the lock
            return
        with self._lock:
            if self._since is None or (self._by_write and not write):
                return
            lasted = max(0.0, self._now() - self._since)
            self._since = None
            failures = self._failures
        log.info("store reachable again after {seconds:.0f} s, {failures} {operations} failed",
                 seconds=lasted, failures=failures,
                 operations="operation" if failures == 1 else "operations")


def told(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is one of an outage that
    `StoreOutages` logged."""
    cause: BaseException | None = error
    for _ in range(_MOST_CAUSES):
        if cause is None:
            return False
        if getattr(cause, _TOLD, False):
            return True
        cause = cause.__cause__
    return False


def log_failure(logger: Logger, format: str, failure: Failure | None = None,
                **fields: Any) -> None:
    """`logger.failure(format, failure, **fields)` for a job that runs every so often,
    unless the failure is of a store outage the store's own lines tell (`StoreOutages`):
    each job would repeat it on each run while it lasts. Call it in the `except` block when
    `failure` is not given."""
    if failure is None:
        failure = Failure()
    if failure.value is not None and told(failure.value):
        return
    logger.failure(format, failure, **fields)
