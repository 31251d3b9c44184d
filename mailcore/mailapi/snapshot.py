"""An answer read from the store and kept a few seconds, for the SMTP server's RCPT checks
(which addresses are hosted mailboxes, which mailboxes are nearly full): under load every
RCPT would otherwise cost a read."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from twisted.internet.defer import DeferredLock
from twisted.internet.interfaces import IReactorTime

T = TypeVar("T")


class Snapshot(Generic[T]):
    """`read()`'s answer, kept `ttl` seconds after the read began.

    Callers that find it expired queue on one lock and the first of them reads it; the rest
    find it fresh when their turn comes (one read for all of them). A change made through
    this process (`invalidate`) while a read is under way keeps that read's answer out of
    the cache: it was taken before the change, and the next caller reads again."""

    def __init__(self, clock: IReactorTime, ttl: float, read: Callable[[], Awaitable[T]]
                 ) -> None:
        self.clock = clock
        self.ttl = ttl
        self._read = read
        self._known: T | None = None
        self._until = 0.0
        self._generation = 0  # bumped by each invalidate
        self._lock = DeferredLock()

    def invalidate(self) -> None:
        self._known = None
        self._generation += 1

    def _fresh(self) -> T | None:
        if self._known is not None and self.clock.seconds() < self._until:
            return self._known
        return None

    async def get(self) -> T:
        known = self._fresh()
        if known is not None:
            return known
        await self._lock.acquire()
        try:
            known = self._fresh()  # read by the caller before us?
            if known is None:
                generation, now = self._generation, self.clock.seconds()
                known = await self._read()
                if generation == self._generation:
                    self._known, self._until = known, now + self.ttl
            return known
        finally:
            self._lock.release()
