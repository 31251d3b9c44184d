"""The reply deadline of every HTTP request: `[web] reply_timeout` seconds after the request
reached its app, a reply that has not begun is answered 503 with Retry-After, in the API's
error shape (`mailcore.outages.DATABASE_SLOW`), instead of holding the client for as long as
the work takes.

What a request waits on that long is the store: a database server that is frozen or hung
(SIGSTOP, a server that still acknowledges TCP) answers no statement and raises no error,
and neither TCP keepalives nor libpq's timeouts end that wait. The handler's work is then
cancelled, as when its client leaves (Klein does that): it stops where it waits. A
transaction it handed to the store and that has not begun is dropped with it and never
runs (mailcore.store.database; a post or upload takes its write back the same way,
mailcore.store.errands); one already begun cannot be called back, so a write whose commit
was under way may still land after its 503 (the README's outage section says so); what
the handler would have done after it is not done. A reply that has begun (a streamed list
or download) is left to finish.

The root resource arms the deadline (`arm`) as it hands the request to its app; every
route's handler is declared through `web.openapi.RouteTable`, which wraps it so that its
result races the deadline (`within_deadline`). An upload's credential check, which comes
before the request reaches its app (web.root.upload_gate), has the same deadline and reply.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, cast

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from mailcore.outages import DATABASE_SLOW
from mailcore.text import first_line
from web.context import context_of
from web.errors import outage_error

log = Logger(namespace="mailcore.web")

F = TypeVar("F", bound=Callable[..., Any])


def arm(request: IRequest, clock: IReactorTime, seconds: float) -> None:
    """Start the request's reply deadline: `seconds` from now, unless it is finished by
    then. (Called once per request, by the root resource.)"""
    overdue: defer.Deferred[None] = defer.Deferred()
    context_of(request).overdue = overdue
    timer = clock.callLater(seconds, _fire, overdue)

    def finished(_: object) -> None:
        if timer.active():
            timer.cancel()

    request.notifyFinish().addBoth(finished)  # type: ignore[attr-defined]


def _fire(overdue: defer.Deferred[None]) -> None:
    overdue.callback(None)


def within_deadline(handler: F) -> F:
    """`handler` (a route's) whose Deferred or coroutine result races the request's reply
    deadline (see the module docstring); a plain result is returned as it is."""

    @functools.wraps(handler)
    def serve(app: Any, request: IRequest, *args: Any, **kwargs: Any) -> Any:
        result = handler(app, request, *args, **kwargs)
        overdue = context_of(request).overdue
        if overdue is None or not (inspect.iscoroutine(result)
                                   or isinstance(result, defer.Deferred)):
            return result
        return _race(request, defer.ensureDeferred(result), overdue)

    return cast(F, serve)


def _race(request: IRequest, work: defer.Deferred[Any], overdue: defer.Deferred[None]
          ) -> defer.Deferred[Any]:
    """What the app renders: `work`'s result, or the 503 of DATABASE_SLOW once the deadline
    passes with no reply begun (then `work` is cancelled). Cancelling it (the client
    left) cancels `work`."""
    answer: defer.Deferred[Any] = defer.Deferred(lambda _: work.cancel())

    def settled(result: object) -> None:
        if not answer.called:
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)
        elif isinstance(result, Failure) and not result.check(defer.CancelledError):
            log.warn("a request answered 503 at [web] reply_timeout failed later: {why}",
                     why=first_line(result.getErrorMessage()))

    def late(_: object) -> None:
        if answer.called or getattr(request, "startedWriting", False):
            return  # answered, or a reply under way (left to finish)
        answer.errback(outage_error(DATABASE_SLOW))
        work.cancel()

    work.addBoth(settled)
    overdue.addCallback(late)
    return answer
