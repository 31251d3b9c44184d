"""Creating SQLAlchemy engines with the settings durability needs.

PostgreSQL sessions run in UTC (`_configure_postgresql`), whatever the server's TimeZone,
without JIT compilation and without parallel workers, named `APPLICATION_NAME` (and the
node), and a transaction left idle for `PG_IDLE_IN_TRANSACTION_MS` (or the `[store]
idle_in_transaction_timeout` given to `make_engine`) ends its session (one
whose client stopped in the middle of a statement is ended by mailcore.store.stuck). A new
connection gives up after `PG_CONNECT_TIMEOUT`, and one over TCP whose server falls silent
after about a minute (`PG_TCP_SETTINGS`); a URL's own parameters win.

SQLite runs in WAL mode with `synchronous=FULL` (a commit is on disk before it returns), a
busy timeout, a larger WAL between checkpoints (`SQLITE_CHECKPOINT_PAGES`), and explicit
BEGIN statements so that writers take the lock up front (`BEGIN IMMEDIATE`) instead of
failing on a read-to-write upgrade. A new database file is made 0600 before SQLite opens
it; SQLite gives its `-wal` and `-shm` files the same mode.

A search of user text without the full-text index (an attachment's name, type or
description) asks `ilike`: PostgreSQL's ILIKE, and on SQLite, whose LIKE and lower() fold
ASCII letters only, LIKE over `SQLITE_LOWER`, Python's str.lower registered on every SQLite
connection under a name of its own (SQLite's lower() is left as it is: the unique indexes
on lower(username) and lower(email) were built with it); on PostgreSQL, ILIKE under ICU's
root collation (`PG_FOLDING_COLLATION`) where the server has it, so that it folds every
letter whatever the database's LC_CTYPE (in the C locale ILIKE folds ASCII only).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import sqlalchemy.exc
from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    LargeBinary,
    and_,
    cast,
    create_engine,
    event,
    func,
    or_,
    text,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

from mailcore.files import private_file

SQLITE_BUSY_TIMEOUT_MS = 30_000
# SQLite copies the WAL back into the database (a checkpoint) once it holds this many pages
# (32 MiB; SQLite's default is 1,000, 4 MiB). Pages written again and again (the B-tree
# and full-text index pages a batch of messages touches) are then copied back once instead
# of once every 4 MiB: a backup's batches stored 15 % faster, final checkpoint included.
# The price: the -wal file grows to about this size and is reused, not truncated.
SQLITE_CHECKPOINT_PAGES = 8192

# PostgreSQL ends a session whose transaction has waited this long for its client (the
# server's idle_in_transaction_session_timeout). Our transactions run on pool threads from
# first statement to commit, with milliseconds of Python between statements; one left idle
# is a node stopped in the middle (a frozen VM, SIGSTOP, a swap storm), and the row locks
# it holds stop every other node: mail acceptance charges the owner's token tank under its
# row lock, so one node stopped mid-commit held every node's SMTP DATA (no 250, the
# clients timing out) for as long as it stayed stopped. Ended, its transaction rolls back
# and its locks go; the stopped node, let go on, finds its connection gone and that
# transaction fails as any database error does (nothing in it had been acknowledged).
PG_IDLE_IN_TRANSACTION_MS = 30_000
# Seconds a new PostgreSQL connection may take (libpq's connect_timeout). A URL's own
# ?connect_timeout= wins, and so does the environment's PGCONNECT_TIMEOUT (libpq and psycopg
# read it only when the connection names no connect_timeout, so this default would override
# it). Without one, a server that takes the TCP connection but never answers (stopped with
# SIGSTOP, hung, a proxy in front of a dead one) held the connecting thread for psycopg's
# own 130 s: the daemon's start hung with nothing said, and at run time each pool thread
# that needed a new connection stopped as long.
PG_CONNECT_TIMEOUT = 10
# libpq's TCP keepalives and TCP_USER_TIMEOUT (ms) on every PostgreSQL connection over TCP
# (a URL's own parameters win; libpq has none of them for a Unix-domain socket). Without
# them a connection whose server went out of reach (a network partition, the server's
# host powered off) with no FIN or RST looked alive for as long as the kernel's defaults
# (Linux: keepalives off unless asked, then 2 h of idle before the first probe; data
# unacknowledged retransmitted for some 15 min): the pool thread waiting on a reply, and
# the request or SMTP DATA waiting on it, stayed blocked that long. Now a silent peer is
# given up after about a minute and the statement fails as any database error does.
PG_TCP_SETTINGS: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 30,  # seconds of silence before the first probe
    "keepalives_interval": 10,  # seconds between probes
    "keepalives_count": 3,  # unanswered probes that end the connection
    "tcp_user_timeout": 60_000,  # ms sent data may stay unacknowledged
}
# What our PostgreSQL sessions call themselves (pg_stat_activity's application_name), with
# the node's name after it in the daemon: mailcore.store.stuck ends such sessions of a
# stopped node that block the others, and only such.
APPLICATION_NAME = "mailcore"

# Key in Connection.info that asks for a write transaction (BEGIN IMMEDIATE on SQLite).
WRITE_INTENT = "mailcore_write"

# The SQL function that lower-cases text as Python does (every letter, not ASCII alone) on
# our SQLite connections: `ilike` searches with it.
SQLITE_LOWER = "mailcore_lower"


# The PostgreSQL collation `ilike` folds under: ICU's root locale, which lower-cases every
# letter as Unicode says, in any database (its own LC_CTYPE may be C). A server built
# without ICU has none; `ilike` then folds as the database's LC_CTYPE does.
PG_FOLDING_COLLATION = "und-x-icu"
# Key in Connection.info: whether this PostgreSQL connection's server has it.
_PG_HAS_FOLDING = "mailcore_pg_has_folding_collation"


def _pg_has_folding_collation(conn: Connection) -> bool:
    """Whether the server of `conn` has `PG_FOLDING_COLLATION` (asked once a connection)."""
    known = conn.info.get(_PG_HAS_FOLDING)
    if known is None:
        known = conn.execute(
            text("SELECT 1 FROM pg_collation WHERE collname = :name"),
            {"name": PG_FOLDING_COLLATION}).first() is not None
        conn.info[_PG_HAS_FOLDING] = known
    return bool(known)


def _unicode_lower(value: object) -> object:
    return value.lower() if type(value) is str else value


def like_pattern(query: str) -> str:
    """A LIKE pattern that finds `query` anywhere, its `%`, `_` and `\\` taken as they
    are (escape character `\\`)."""
    return "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def ilike(conn: Connection, column: Any, pattern: str) -> ColumnElement[bool]:
    """`column ILIKE pattern` (escape character `\\`), folding every letter on SQLite and
    PostgreSQL alike: "RÉSUMÉ" finds "résumé.pdf" on both (SQLite's LIKE folds ASCII only,
    and so does PostgreSQL's ILIKE in a database of the C locale, unless asked under
    `PG_FOLDING_COLLATION`).

    On SQLite, `SQLITE_LOWER` (a call into Python, some 0.5 us a value) runs only for a
    value with a character beyond ASCII (its length in characters below its length in
    bytes); an ASCII value is answered by LIKE itself, which folds it alike."""
    if conn.dialect.name == "sqlite":
        lowered = pattern.lower()
        beyond_ascii = func.length(column) < func.length(cast(column, LargeBinary))
        return or_(column.like(lowered, escape="\\"), and_(
            beyond_ascii, getattr(func, SQLITE_LOWER)(column).like(lowered, escape="\\")))
    if _pg_has_folding_collation(conn):
        column = column.collate(PG_FOLDING_COLLATION)
    matched: ColumnElement[bool] = column.ilike(pattern, escape="\\")
    return matched


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, *, pool_size: int = 5, node: str = "",
                idle_in_transaction_ms: int = PG_IDLE_IN_TRANSACTION_MS) -> Engine:
    """An engine for `url`; SQLite gets WAL, FULL sync and explicit transactions, PostgreSQL
    sessions in UTC, named `APPLICATION_NAME` and `node`, ended when idle in a transaction
    for `idle_in_transaction_ms`."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        name = f"{APPLICATION_NAME} {node}" if node else APPLICATION_NAME
        connect_args: dict[str, Any] = {"application_name": name[:63]}
        defaults: dict[str, int] = {}
        if "PGCONNECT_TIMEOUT" not in os.environ:
            defaults["connect_timeout"] = PG_CONNECT_TIMEOUT
        if not _unix_socket_only(parsed):
            defaults.update(PG_TCP_SETTINGS)
        for key, value in defaults.items():
            if key not in parsed.query:
                connect_args[key] = value
        engine = create_engine(
            url, pool_size=pool_size, max_overflow=0, pool_pre_ping=True, future=True,
            connect_args=connect_args,
        )
        _configure_postgresql(engine, idle_in_transaction_ms)
        return engine
    kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30}}
    if parsed.database in (None, "", ":memory:"):
        kwargs["poolclass"] = StaticPool
    elif not parsed.query.get("uri") and not parsed.database.startswith("file:"):
        try:
            private_file(Path(parsed.database))
        except OSError:
            pass  # SQLite says what is wrong (no such directory, ...) when it connects
    engine = create_engine(url, **kwargs)
    _configure_sqlite(engine)
    return engine


def _unix_socket_only(parsed: URL) -> bool:
    """Whether libpq reaches every host of a PostgreSQL URL over a Unix-domain socket: a
    host (the URL's, else its `?host=`, else PGHOST) that is a directory, or none at all
    (libpq's default socket), and no `?hostaddr=`."""
    if "hostaddr" in parsed.query:
        return False
    given = parsed.query.get("host") or parsed.host or os.environ.get("PGHOST", "")
    hosts = ",".join(given) if isinstance(given, tuple) else given
    return all(h.startswith(("/", "@")) for h in hosts.split(",") if h)


def _configure_postgresql(engine: Engine, idle_in_transaction_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # The session in UTC, whatever the server's TimeZone (or the URL's options) says:
        # times then come back as SQLite's do, in `datetime.UTC` (the JSON encoders' fast
        # case, not a zoneinfo's offset looked up for each), and what the server does with
        # times in SQL (a day's bounds, `date_trunc`) is the same on every node. A SET on
        # each new connection rather than libpq's `options`, which a pooler such as
        # PgBouncer may refuse.
        #
        # No JIT compilation and no parallel workers: both pay off for long analytic
        # queries, and ours are short, many at once. PostgreSQL decides on them from the
        # plan's estimated cost, and a generic plan (what a statement psycopg prepared runs
        # on) prices a page's LIMIT $n at a tenth of the rows. Over 100,000 messages: a
        # thread list's page, read in 0.4 ms, was compiled for 20 ms on every run; a small
        # account's page (0.1 ms of work) started two workers for 8 ms; the count of a
        # common word in one account scanned the search table with workers, 300 ms a
        # request against 100 ms without (per request; every worker is a core the other
        # requests wait for). Only a sort of all of a user's rows (a list in subject
        # order) was faster with them: 160 ms against 250.
        cursor = dbapi_connection.cursor()
        cursor.execute("SET TIME ZONE 'UTC'")
        cursor.execute("SET jit = off")
        cursor.execute("SET max_parallel_workers_per_gather = 0")
        cursor.execute(f"SET idle_in_transaction_session_timeout = {int(idle_in_transaction_ms)}")
        cursor.close()
        dbapi_connection.commit()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let us issue BEGIN ourselves; pysqlite's implicit transactions are wrong for us.
        dbapi_connection.isolation_level = None
        dbapi_connection.create_function(SQLITE_LOWER, 1, _unicode_lower, deterministic=True)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_CHECKPOINT_PAGES}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Straight to the driver: this runs for every transaction, spool commits included.
        # executescript runs it in one step with the GIL released once (execute releases
        # it twice: step and reset); it would first COMMIT an open transaction, so refuse.
        statement = "BEGIN IMMEDIATE" if conn.info.get(WRITE_INTENT, True) else "BEGIN"
        driver = conn.connection.driver_connection
        if driver.in_transaction:
            raise sqlalchemy.exc.InvalidRequestError("a driver transaction is already open")
        try:
            driver.executescript(statement)
        except sqlite3.OperationalError as e:
            # As SQLAlchemy would have wrapped it: "database is locked" is then retried.
            raise sqlalchemy.exc.OperationalError(statement, None, e) from e
