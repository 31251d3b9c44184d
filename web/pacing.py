"""Backpressure for replies written a piece at a time (files, long JSON members).

`paced(request)` registers a `Pacer` (`mailcore.pacing`) as the request's streaming
producer for the `with` block: the writer awaits `pacer.ready()` between pieces, which
waits while the client's transport is full, and stops when `pacer.stopped` (the client
went away). On the way out the producer is unregistered, unless the lost connection has
taken the request's channel with it (twisted.web's Request.connectionLost), where
unregistering would raise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

from twisted.web import http
from twisted.web.iweb import IRequest

from mailcore.pacing import Pacer


@contextmanager
def paced(request: IRequest) -> Iterator[Pacer]:
    """A Pacer registered as `request`'s producer for the block (see the module docstring)."""
    pacer = Pacer()
    consumer = cast(http.Request, request)
    consumer.registerProducer(pacer, True)
    try:
        yield pacer
    finally:
        if consumer.channel is not None:
            consumer.unregisterProducer()
