"""Which failures are a resource running out or away rather than a bug: a full disk (the
files directories, SQLite's file) or a database server that cannot be reached. The HTTP APIs
answer those 507 or 503 with Retry-After, a line in the log without a traceback, instead of a
500 with a traceback per request; they end when the resource is back (nothing to restart).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from sqlalchemy.exc import DBAPIError, OperationalError

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
