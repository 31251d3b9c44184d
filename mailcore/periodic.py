"""A service that runs one piece of work every so often on an injected clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailcore.outages import log_failure
from mailcore.store import Database
from mailcore.store.leases import JobLeases

log = Logger()

T = TypeVar("T")


class InFlight:
    """Runs started and not yet ended, so that a stop can wait for them:
    `LoopingCall.stop()` does not wait for the Deferred of a run in flight, which then
    finishes after the stop (on a store that may be closed by then)."""

    def __init__(self) -> None:
        self._runs: set[defer.Deferred[Any]] = set()

    def track(self, d: defer.Deferred[T]) -> defer.Deferred[T]:
        """Remember the run `d` until it ends; its result is passed on unchanged."""
        if d.called:
            return d  # ended already: nothing to wait for
        self._runs.add(d)

        def ended(result: object) -> object:
            self._runs.discard(d)
            return result

        d.addBoth(ended)
        return d

    async def wait(self) -> None:
        """Until every run started so far has ended (its failure is left to its own
        callers)."""
        while self._runs:
            await defer.DeferredList(list(self._runs))


class PeriodicService(Service):
    """Calls `tick()` at start (unless `tick_at_start` is false: the work was done just
    before) and then every `interval()` seconds on `self.clock`, waiting for a tick's
    Deferred before the next. Stopping cancels the timer and returns a Deferred
    that fires once a tick in flight has ended, so that the daemon closes the store only
    after it. `tick` must not fail: a failure would stop the loop.

    With `leases` set (the Core sets them for work that must run on one node of those
    sharing the store), a tick runs only if this node claims this period's run of the job
    `name` in the store's `job_leases` (see `mailcore.store.leases`): however many nodes
    tick, the work runs at most once per period."""

    clock: IReactorTime
    leases: JobLeases | None = None
    tick_at_start = True
    _loop: LoopingCall | None = None
    _in_flight: InFlight | None = None

    def interval(self) -> float:  # pragma: no cover - every subclass says
        raise NotImplementedError

    def tick(self) -> defer.Deferred[None] | None:  # pragma: no cover - likewise
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        self._in_flight = InFlight()
        self._loop = LoopingCall(self._tracked_tick, self._in_flight)
        self._loop.clock = self.clock
        self._loop.start(self.interval(), now=self.tick_at_start)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is None:
            return defer.succeed(None)
        return defer.Deferred.fromCoroutine(in_flight.wait())

    def _tracked_tick(self, in_flight: InFlight) -> defer.Deferred[None] | None:
        d = self.leased_tick()
        return None if d is None else in_flight.track(d)

    def leased_tick(self) -> defer.Deferred[None] | None:
        """One run as the timer makes it: `tick()`, on this node only if it holds the job."""
        if self.leases is None:
            return self.tick()
        return defer.Deferred.fromCoroutine(self._claim_then_tick(self.leases))

    async def _claim_then_tick(self, leases: JobLeases) -> None:
        try:
            mine = await leases.claim_periodic(str(self.name), self.clock.seconds(),
                                               self.interval())
        except Exception:
            log_failure(log, "claiming the {name} job failed; it is skipped this time",
                        name=self.name)
            return
        if mine:
            await defer.maybeDeferred(self.tick)


class Sweeper(PeriodicService, Generic[T]):
    """A PeriodicService whose tick is one clean-up of the store (`sweep()`: deleting what
    nothing needs any more) every `every` seconds. A failed sweep is logged (`failed`, the
    line) and tried again at the next tick; a finished one is told to `swept` (a subclass
    logs what it removed). Every node may run one whose deletes are idempotent."""

    failed = "a sweep failed"

    def __init__(self, clock: IReactorTime, every: float) -> None:
        self.clock = clock
        self.every = every

    def interval(self) -> float:
        return self.every

    def sweep(self) -> Awaitable[T]:  # pragma: no cover - every subclass says
        raise NotImplementedError

    def swept(self, result: T) -> None:
        """What the sweep did (`sweep()`'s result): nothing to tell by default."""

    def tick(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        try:
            result = await self.sweep()
        except Exception:
            log_failure(log, self.failed)
            return
        self.swept(result)


async def delete_in_batches(db: Database, name: str, thd: Callable[..., int], *args: Any,
                            batch: int) -> int:
    """Run `thd(conn, *args, batch)` (which deletes up to `batch` rows, and says how many) a
    transaction at a time until a batch comes short; how many rows went. A sweep's deletes
    so hold their row locks one short transaction at a time."""
    gone = 0
    while True:
        n = await db.run(name, thd, *args, batch)
        gone += n
        if n < batch:
            return gone
