"""One-time codes by text message: an HTTP POST to the operator's SMS gateway.

`[safedrop] sms_gateway` is the gateway's URL (http or https); each message is a form POST
with `to` (the recipient's number, international digits without "+") and `text`. Any 2xx
answer counts as sent. The URL is the operator's, not a user's, so it is not held to a
network policy. Without a gateway (the default) codes go by mail.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from twisted.internet.defer import Deferred, succeed
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer


class SmsError(Exception):
    """The gateway did not take the message."""


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


class SmsGateway:
    """Sends text messages through one HTTP gateway with a treq-style client."""

    def __init__(self, url: str, http: Any) -> None:
        self.url = url
        self.http = http

    @classmethod
    def over(cls, url: str, reactor: Any) -> SmsGateway:
        """A gateway reached with a treq client on `reactor` (no pooling, no cookies)."""
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        agent = Agent(reactor, connectTimeout=30, pool=HTTPConnectionPool(reactor, False))
        # Bodies are written by _Form at once, not by treq's default producer (which runs on
        # the global cooperator).
        return cls(url, HTTPClient(agent, data_to_body_producer=_Form))

    async def send(self, to: str, text: str) -> None:
        body = urlencode({"to": to, "text": text}).encode("utf-8")
        try:
            response = await self.http.request(
                "POST", self.url, data=body,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            await response.content()
        except Exception as e:
            raise SmsError(f"the SMS gateway could not be reached: {e}") from None
        if not 200 <= response.code < 300:
            raise SmsError(f"the SMS gateway answered {response.code}")
