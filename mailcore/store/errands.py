"""An errand: the store work a caller hands in for one request, that it may give up on as a
whole without stopping what has begun.

A cancelled store Deferred (`Database`'s, `Spool.ride`'s) drops its work when it has not
begun, and otherwise lets it finish unheard. Work whose outcome must be known whatever the
caller does (an upload: its file is kept with its row, or taken back without one) cannot be
cancelled that way: the caller would be told "cancelled" while the row may still commit.
Such work runs as an errand instead (`Errand.run`), its caller's wait shielded from
cancellation (`mailcore.uploads.shielded`): when the caller gives up (`give_up`, from the
canceller of what it awaits), the store work the errand handed in that has not begun is
withdrawn (its Deferred fails with CancelledError inside the errand, which cleans up after
itself) and none handed in later begins; work already begun ends as it would have, and the
errand goes on with its outcome (a row committed keeps its file). The caller stops waiting
at once either way.

The errand in course is a context variable, so the store sees it through any depth of
coroutines (Twisted runs each coroutine in a copy of the context it started in).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any, TypeVar

from twisted.internet import defer

T = TypeVar("T")

_current: ContextVar[Errand | None] = ContextVar("mailcore_errand", default=None)


class Errand:
    """The store work of one caller's request (see the module docstring)."""

    def __init__(self) -> None:
        self.given_up = False
        # Work handed in and not finished: how to withdraw each unless it has begun.
        self._held: dict[defer.Deferred[Any], Callable[[], None]] = {}

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Await `work` as (part of) this errand: the store work it hands in is withdrawn
        when the errand is given up before it begins. Given up already: `work` does not
        start (CancelledError)."""
        if self.given_up:
            work.close()
            raise defer.CancelledError()
        token = _current.set(self)
        try:
            return await work
        finally:
            _current.reset(token)

    def hold(self, d: defer.Deferred[Any], withdraw: Callable[[], None]) -> None:
        """Store work `d` was handed in within this errand; `withdraw()` drops it (and
        fails `d` with CancelledError) unless it has begun. Called by the store."""
        self._held[d] = withdraw
        d.addBoth(self._finished, d)

    def _finished(self, result: object, d: defer.Deferred[Any]) -> object:
        self._held.pop(d, None)
        return result

    def give_up(self) -> None:
        """The caller gives up: withdraw the work not yet begun; none begins from now."""
        self.given_up = True
        for withdraw in list(self._held.values()):
            withdraw()


def hand_in(
    start: Callable[[], tuple[defer.Deferred[T], Callable[[], None]]],
) -> defer.Deferred[T]:
    """Hand store work in (`Database`'s, `Spool.ride`'s) within the errand of the code
    running now, if any: once the errand is given up none is handed in (CancelledError);
    otherwise `start()` queues the work and returns its Deferred and how to withdraw it
    unless it has begun, which the errand holds until the work ends."""
    errand = _current.get()
    if errand is not None and errand.given_up:
        return defer.fail(defer.CancelledError())
    d, withdraw = start()
    if errand is not None:
        errand.hold(d, withdraw)
    return d


def outside(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` outside any errand: the coroutines it starts (each runs in a copy of the
    context it started in) hand their store work in for no caller. For work that serves
    every caller (the spool's write lane, the outbox's sending, a batch of token charges)
    when a request within an errand happens to start it: it took the errand along, and was
    given up with that request."""
    token = _current.set(None)
    try:
        return fn(*args)
    finally:
        _current.reset(token)
