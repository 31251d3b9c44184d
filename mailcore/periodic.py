"""A service that runs one piece of work every so often on an injected clock."""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall


class PeriodicService(Service):
    """Calls `tick()` at start and then every `interval()` seconds on `self.clock`, waiting
    for a tick's Deferred before the next; stopping cancels the timer (a tick in flight
    finishes on its own). `tick` must not fail: a failure would stop the loop."""

    clock: IReactorTime
    _loop: LoopingCall | None = None

    def interval(self) -> float:  # pragma: no cover - every subclass says
        raise NotImplementedError

    def tick(self) -> defer.Deferred[None] | None:  # pragma: no cover - likewise
        raise NotImplementedError

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.clock
        self._loop.start(self.interval(), now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
