"""A service that runs one piece of work every so often on an injected clock."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailcore.store.leases import JobLeases

log = Logger()


class PeriodicService(Service):
    """Calls `tick()` at start and then every `interval()` seconds on `self.clock`, waiting
    for a tick's Deferred before the next; stopping cancels the timer (a tick in flight
    finishes on its own). `tick` must not fail: a failure would stop the loop.

    With `leases` set (the Core sets them for work that must run on one node of those
    sharing the store), a tick runs only if this node claims this period's run of the job
    `name` in the store's `job_leases` (see `mailcore.store.leases`): however many nodes
    tick, the work runs at most once per period."""

    clock: IReactorTime
    leases: JobLeases | None = None
    _loop: LoopingCall | None = None

    def interval(self) -> float:  # pragma: no cover - every subclass says
        raise NotImplementedError

    def tick(self) -> defer.Deferred[None] | None:  # pragma: no cover - likewise
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.leased_tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval(), now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

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
            log.failure("claiming the {name} job failed; it is skipped this time",
                        name=self.name)
            return
        if mine:
            await defer.maybeDeferred(self.tick)
