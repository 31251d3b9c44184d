"""Ending the database sessions of stopped nodes that hold locks others wait for.

Nodes sharing one PostgreSQL lock rows for the length of a transaction (mail acceptance
charges the owner's token tank under its row lock). A node stopped in the middle of one (a
frozen VM, SIGSTOP, a swap storm) keeps its locks, and every other node's transactions that
need those rows wait for as long as it stays stopped. PostgreSQL ends a session left idle
in a transaction (`mailcore.store.engine.PG_IDLE_IN_TRANSACTION_MS`), but only one its
client left between statements: after the server's ready-for-query. A client stopped
while it was still sending a statement (libpq writes a statement of more than 8 KiB, a
group commit's message bodies, in several writes; a pipeline sends several statements
before its Sync) leaves the session waiting for the rest of it, `active`, where neither
that timeout nor `statement_timeout` ends it. One such stop held every node's mail
acceptance for as long as the node stayed stopped (the two-node test that stops a node
with SIGSTOP timed out so, once in many runs).

So every node looks, every `CHECK_INTERVAL` seconds (every `silent`, when shorter), for
sessions of Mailcore (`application_name` starting with `APPLICATION_NAME`) inside a
transaction, waiting on their client (pg_stat_activity's wait event type `Client`) for at
least `silent` seconds (`[store] idle_in_transaction_timeout`, `SILENT_SECONDS` unless set),
that block another session, and ends them (pg_terminate_backend: their transactions roll
back, and nothing in them had been acknowledged). Our transactions run on pool threads
from first statement to commit, milliseconds apart: a live node's session never waits on
it that long. Sessions of other programs (an operator's psql) are never ended. On every node, not
leased: the node holding the lease could be the stopped one.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, text
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from mailcore.outages import log_failure
from mailcore.periodic import PeriodicService
from mailcore.store.database import Database
from mailcore.store.engine import APPLICATION_NAME, PG_IDLE_IN_TRANSACTION_MS

log = Logger()

# How long a session in a transaction may wait on its client while it blocks others: as
# long as PostgreSQL lets one idle between statements.
SILENT_SECONDS = PG_IDLE_IN_TRANSACTION_MS / 1000
CHECK_INTERVAL = 10.0

# The conditions are checked again by the statement that ends the session, so a session
# that moved on since it was seen is left alone.
_END_STUCK = text("""
    SELECT b.pid, b.application_name, host(b.client_addr) AS client_addr, b.client_port,
           extract(epoch FROM clock_timestamp() - b.state_change) AS silent,
           (SELECT count(*) FROM pg_stat_activity AS w
             WHERE b.pid = ANY (pg_blocking_pids(w.pid))) AS blocked,
           pg_terminate_backend(b.pid) AS ended
      FROM pg_stat_activity AS b
     WHERE b.datname = current_database()
       AND b.pid <> pg_backend_pid()
       AND b.application_name LIKE :prefix
       AND b.xact_start IS NOT NULL
       AND b.wait_event_type = 'Client'
       AND b.state_change <= clock_timestamp() - make_interval(secs => :silent)
       AND EXISTS (SELECT 1 FROM pg_stat_activity AS w
                    WHERE b.pid = ANY (pg_blocking_pids(w.pid)))
""")


@dataclass(frozen=True)
class EndedSession:
    pid: int
    application_name: str
    client: str
    silent: float
    blocked: int
    ended: bool


def thd_end_stuck_sessions(conn: Connection, silent: float = SILENT_SECONDS
                           ) -> list[EndedSession]:
    """Blocking: end the Mailcore sessions that wait on their client inside a transaction
    for at least `silent` seconds while blocking another session (PostgreSQL; nothing on
    SQLite, where one process holds the store)."""
    if conn.dialect.name != "postgresql":
        return []
    rows = conn.execute(_END_STUCK, {"prefix": APPLICATION_NAME + "%", "silent": silent})
    return [
        EndedSession(int(r.pid), str(r.application_name),
                     f"{r.client_addr or 'local'}:{r.client_port or ''}".rstrip(":"),
                     float(r.silent), int(r.blocked), bool(r.ended))
        for r in rows
    ]


class StuckSessionReaper(PeriodicService):
    """Every `CHECK_INTERVAL`, ends the sessions of stopped nodes that block others (see
    the module's text). Runs on the read lane: the shared pool's threads may be the ones
    waiting for the locks."""

    name = "stuck_sessions"

    def __init__(self, db: Database, clock: IReactorTime,
                 silent: float = SILENT_SECONDS) -> None:
        self.db = db
        self.clock = clock
        self.silent = silent

    def interval(self) -> float:
        # A bound shorter than the interval would be waited out a whole interval late.
        return min(CHECK_INTERVAL, self.silent)

    def tick(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._check())

    async def _check(self) -> None:
        try:
            ended = await self.db.read("end_stuck_sessions", thd_end_stuck_sessions,
                                       self.silent)
        except Exception:
            # (Ending another role's session is refused: the nodes connect as one role, or
            # as members of pg_signal_backend.)
            log_failure(log, "looking for or ending stopped nodes' database sessions failed")
            return
        for s in ended:
            if s.ended:
                log.warn("ended database session {pid} ({name}, {client}): in a transaction "
                         "and silent for {silent:.0f} s, it held locks {blocked} other "
                         "sessions waited for (a node stopped in the middle of a statement?)",
                         pid=s.pid, name=s.application_name, client=s.client,
                         silent=s.silent, blocked=s.blocked)
