"""The baseline for `make bench`: a bare Twisted ESMTP server that discards every message.

Same framework as Mailcore's inbound side (twisted.mail.smtp.ESMTP on the epoll reactor), no
durability, no delivery: `python bench/bare_twisted.py PORT`.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.mail import smtp
from zope.interface import implementer


@implementer(smtp.IMessage)
class _Discard:
    def lineReceived(self, line: bytes) -> None:
        pass

    def eomReceived(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: by bench"

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        return origin

    def validateTo(self, user: Any) -> Any:
        return _Discard


class _Factory(smtp.SMTPFactory):
    protocol = smtp.ESMTP

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        p.delivery = _Delivery()
        return p


def main() -> None:
    port = int(sys.argv[1])
    reactor.listenTCP(port, _Factory(), interface="127.0.0.1", backlog=1000)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
