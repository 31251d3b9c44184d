"""The database server's clock, for the services of nodes that share one PostgreSQL.

Nodes judge each other's leases (`job_leases`, queue recipients, account syncs, webhook
deliveries) by the times they write into the store: a lease written as "until T" by one node
is taken by another once that one's clock passes T. Were each node to read its own clock, a
node whose clock runs 5 minutes ahead would take every lease another still holds (its jobs
ran twice, its mail was sent twice). So a daemon's services read `DatabaseTime`: the
reactor with `seconds()` moved by the offset of PostgreSQL's clock from the node's, measured
before the reactor runs and again every `FOLLOW_INTERVAL` (a node's clock stepped meanwhile
is caught up with then). Timers are the reactor's own (their delays do not depend on the
offset). On SQLite there is one node and the offset stays 0.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Engine, func, select
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import alsoProvides, implementer, providedBy

from mailcore.outages import log_failure
from mailcore.periodic import PeriodicService
from mailcore.store.database import Database

log = Logger()

# How often a node measures the database's clock again.
FOLLOW_INTERVAL = 60.0
# An offset at least this large (seconds) is logged when it is first measured, or when it
# moved by this much since: the node's clock is off, and its operator should hear of it.
NOTABLE = 1.0


def thd_database_clock(conn: Connection) -> float | None:
    """Blocking: the database server's clock (Unix time) on PostgreSQL; None on SQLite
    (one node: the node's own clock is the store's)."""
    if conn.dialect.name != "postgresql":
        return None
    return float(conn.execute(
        select(func.extract("epoch", func.clock_timestamp()))).scalar_one())


@implementer(IReactorTime)
class DatabaseTime:
    """`reactor` whose `seconds()` is the database server's clock (the reactor's plus the
    last measured offset); every other attribute and interface is the reactor's."""

    def __init__(self, reactor: IReactorTime) -> None:
        self._reactor = reactor
        self.offset = 0.0
        self._logged: float | None = None
        alsoProvides(self, providedBy(reactor))  # its listeners, resolvers, threads...

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    @property
    def offset(self) -> float:
        """The database server's clock minus the reactor's (seconds)."""
        return self._offset

    @offset.setter
    def offset(self, value: float) -> None:
        # `seconds` is read many times per relayed message (timers, leases, the spool,
        # the SMTP sessions): with no offset (SQLite, where it stays 0) it is the
        # reactor's own, with no call of ours around it. A PostgreSQL offset, measured
        # from two reads of two clocks, is almost never exactly 0.
        self._offset = value
        if value:
            self.__dict__.pop("seconds", None)
        else:
            self.seconds = self._reactor.seconds  # type: ignore[method-assign]

    def seconds(self) -> float:
        return self._reactor.seconds() + self._offset

    def callLater(self, delay: float, callable: Any, *args: object,
                  **kwargs: object) -> IDelayedCall:
        return self._reactor.callLater(delay, callable, *args, **kwargs)

    def getDelayedCalls(self) -> Any:
        return self._reactor.getDelayedCalls()

    def follow_blocking(self, engine: Engine) -> None:
        """Measure the offset now. Blocks: for the daemon before its reactor runs."""
        with engine.connect() as conn:
            before = self._reactor.seconds()
            theirs = thd_database_clock(conn)
            self._set(before, theirs, self._reactor.seconds())

    async def follow(self, db: Database) -> None:
        """Measure the offset again (on the store's thread pool)."""
        before = self._reactor.seconds()
        theirs = await db.read("database_clock", thd_database_clock)
        self._set(before, theirs, self._reactor.seconds())

    def _set(self, before: float, theirs: float | None, after: float) -> None:
        if theirs is None:
            return
        self.offset = theirs - (before + after) / 2
        if abs(self.offset) >= NOTABLE and (
                self._logged is None or abs(self.offset - self._logged) >= NOTABLE):
            self._logged = self.offset
            log.warn("this node's clock is {skew:.1f} s {way} the database server's: its "
                     "services read the database server's (leases and due times are "
                     "judged by it); set this node's clock right (NTP)",
                     skew=abs(self.offset), way="behind" if self.offset > 0 else "ahead of")


class ClockFollower(PeriodicService):
    """Measures the database server's clock for `time` every `FOLLOW_INTERVAL`."""

    name = "database_clock"

    def __init__(self, time: DatabaseTime, db: Database) -> None:
        self.time = time
        self.clock = time
        self.db = db

    def interval(self) -> float:
        return FOLLOW_INTERVAL

    def tick(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._follow())

    async def _follow(self) -> None:
        try:
            await self.time.follow(self.db)
        except Exception:
            log_failure(log, "reading the database server's clock failed")
