"""Backpressure for what is written to a transport a piece at a time.

A `Pacer` is registered as a transport's (or an HTTP request's) streaming producer while a
writer hands it pieces: the transport pauses it when what it holds unsent passes its buffer
size and resumes it once that is sent. The writer awaits `pacer.ready()` between pieces,
which waits while the transport is full, and stops when `pacer.stopped` (the connection is
gone). The SMTP client's DATA stream (`mailcore.smtp.client.write_paced`) and the web's
replies written a piece at a time (`web.pacing.paced`) use it.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer


@implementer(IPushProducer)
class Pacer:
    """Backpressure from the transport: the writer waits while it is paused."""

    def __init__(self) -> None:
        self._waiting: defer.Deferred[None] | None = None
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    async def ready(self) -> None:
        if self.paused and not self.stopped:
            self._waiting = defer.Deferred()
            await self._waiting
