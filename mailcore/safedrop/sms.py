"""One-time codes by text message: an HTTP POST to the operator's SMS gateway.

`[safedrop] sms_gateway` is the gateway's URL (http or https); each message is a form POST
with `to` (the recipient's number, international digits without "+") and `text`. Any 2xx
answer counts as sent. The URL is the operator's, not a user's, so it is not held to a
network policy. Without a gateway (the default) codes go by mail.

A message that has had no whole answer SMS_TIMEOUT seconds after it started (connecting
included: a gateway that takes the connection and never answers) is a failure, its
connection closed: the recipient's code then goes by mail, as it does when the gateway
refuses it, well before the request waits out `[web] reply_timeout`.
"""

from __future__ import annotations

from typing import Any, NoReturn
from urllib.parse import urlencode

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

# Seconds one message may take in all (connect, send, read the answer), then SmsError.
SMS_TIMEOUT = 15.0


class SmsError(Exception):
    """The gateway did not take the message."""


class _NoAnswer(Exception):
    """The message had no whole answer within SMS_TIMEOUT."""


def _no_answer(result: object, timeout: float) -> NoReturn:
    """`Deferred.addTimeout`'s answer for a message cancelled at its deadline, whatever the
    cancelled request failed with."""
    raise _NoAnswer()


@implementer(IBodyProducer)
class _Form:
    """A form body written at once (no cooperator, no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        """Written at once: nothing to pause."""

    def resumeProducing(self) -> None:
        """Written at once: nothing to resume."""

    def stopProducing(self) -> None:
        """Written at once: nothing to stop."""


class _Answer(Protocol):
    """Reads a gateway's answer body to its end, keeping none of it: `done` fires then.
    Cancelling `done` (the deadline) closes the connection, which cancelling treq's
    `content()` does not (it has no canceller: a gateway that sent its headers and not the
    whole body kept the connection open for as long as it liked)."""

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[None]) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        """The body says nothing we use: only its end counts."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:  # cancelled at the deadline
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


class SmsGateway:
    """Sends text messages through one HTTP gateway with a treq-style client, each within
    SMS_TIMEOUT seconds of `clock`."""

    def __init__(self, url: str, http: Any, clock: IReactorTime) -> None:
        self.url = url
        self.http = http
        self.clock = clock

    @classmethod
    def over(cls, url: str, reactor: Any) -> SmsGateway:
        """A gateway reached with a treq client on `reactor` (no pooling, no cookies)."""
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        agent = Agent(reactor, connectTimeout=SMS_TIMEOUT,
                      pool=HTTPConnectionPool(reactor, False))
        # Bodies are written by _Form at once, not by treq's default producer (which runs on
        # the global cooperator).
        return cls(url, HTTPClient(agent, data_to_body_producer=_Form), reactor)

    async def send(self, to: str, text: str) -> None:
        """Send `text` to the number `to`; SmsError when the gateway could not be reached,
        did not answer in time (the request cancelled: its connection closes) or answered
        anything but 2xx. Cancelled by the caller (its client left), the request is
        cancelled too and CancelledError raised: that is no failure of the gateway's, for
        which a caller would send the code another way."""
        body = urlencode({"to": to, "text": text}).encode("utf-8")
        posting = Deferred.fromCoroutine(self._post(body))
        # Cancelled at the deadline, whatever the client makes of that (Agent: a
        # ResponseNeverReceived).
        posting.addTimeout(SMS_TIMEOUT, self.clock, onTimeoutCancel=_no_answer)
        # The caller's cancel, told apart: the client makes of it what it makes of the
        # deadline's (Agent: ResponseNeverReceived, or ConnectingCancelledError).
        gave_up: list[bool] = []

        def give_up(_: Deferred[int]) -> None:
            gave_up.append(True)
            posting.cancel()

        waiting: Deferred[int] = Deferred(give_up)
        posting.chainDeferred(waiting)
        try:
            code = await waiting
        except _NoAnswer:
            raise SmsError(f"the SMS gateway did not answer within {SMS_TIMEOUT:g} s") \
                from None
        except Exception as e:
            if gave_up:
                raise CancelledError() from None
            raise SmsError(f"the SMS gateway could not be reached: {e}") from None
        if not 200 <= code < 300:
            raise SmsError(f"the SMS gateway answered {code}")

    async def _post(self, body: bytes) -> int:
        """POST the form and read the whole answer; its status code."""
        response = await self.http.request(
            "POST", self.url, data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            unbuffered=True,  # the body is read (and dropped) by _Answer, not kept
        )
        answer = _Answer()
        response.deliverBody(answer)
        await answer.done
        return int(response.code)
