"""The guarded HTTP client deliveries go out on: every address a host resolves to is checked
against the operator's network policy when the connection is made; no cookies, bounded reads
(a connection that receives more than MAX_ANSWER_BYTES is aborted)."""

from __future__ import annotations

from http.cookiejar import Cookie
from typing import Any

from treq.cookies import IndexableCookieJar
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import (
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.client import URI
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from mailcore.netpolicy import GuardedEndpoint
from mailcore.webhooks.settings import AddressPolicy

USER_AGENT = "Mailcore-Webhooks/1"
# Why a delivery to a host is refused (after the host; the addresses are the operator's).
REFUSAL = "is where this server does not send webhooks"
# How much of a receiver's answer the delivery log keeps.
SNIPPET_BYTES = 512
# The most one delivery connection reads: the answer's status line and headers, and the
# first bytes of its body. Past it the connection is aborted (Twisted's parser keeps every
# header line, with no limit on how many).
MAX_ANSWER_BYTES = 64 * 1024 + SNIPPET_BYTES


class AnswerTooLong(Exception):
    """The receiver sent more than MAX_ANSWER_BYTES on one connection."""

    def __str__(self) -> str:
        return f"the answer was longer than {MAX_ANSWER_BYTES} bytes"


@implementer(IBodyProducer)
class _BytesProducer:
    """A request body written at once (no cooperator, no global reactor)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Snippet(Protocol):
    """Keeps the first bytes of a receiver's answer and drops the connection after them (or
    when the wait for them is cancelled)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = b""
        self.done: Deferred[bytes] = Deferred(self._cancelled)

    def _cancelled(self, _: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if len(self.data) < self.limit:
            self.data += data[: self.limit - len(self.data)]
            if len(self.data) >= self.limit and self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        if not self.done.called:
            self.done.callback(self.data)


class _Bounded(ProtocolWrapper):
    """Counts the bytes a connection receives and aborts it past the factory's limit; the
    wrapped protocol then loses the connection with AnswerTooLong. Stopping the answer (the
    snippet is full, or its wait was cancelled) aborts the connection too."""

    factory: _BoundedFactory

    def __init__(self, factory: _BoundedFactory, wrapped: Any) -> None:
        super().__init__(factory, wrapped)
        self.received = 0
        self.exceeded = False

    def dataReceived(self, data: bytes) -> None:
        if self.exceeded:
            return
        self.received += len(data)
        if self.received > self.factory.limit:
            self.exceeded = True
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        super().dataReceived(data)

    def stopProducing(self) -> None:
        # The client is done reading (or gave up): never wait for the receiver to close.
        self.transport.abortConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:
        super().connectionLost(Failure(AnswerTooLong()) if self.exceeded else reason)


class _BoundedFactory(WrappingFactory[_Bounded]):
    protocol = _Bounded

    def __init__(self, wrapped: IProtocolFactory, limit: int) -> None:
        super().__init__(wrapped)
        self.limit = limit


@implementer(IStreamClientEndpoint)
class _BoundedEndpoint:
    """An endpoint whose connections read at most `limit` bytes (see _Bounded)."""

    def __init__(self, endpoint: IStreamClientEndpoint, limit: int) -> None:
        self.endpoint = endpoint
        self.limit = limit

    def connect(self, factory: IProtocolFactory) -> Deferred[Any]:
        d: Deferred[Any] = self.endpoint.connect(_BoundedFactory(factory, self.limit))
        return d.addCallback(_unwrap)


def _unwrap(wrapper: ProtocolWrapper) -> Any:
    """The protocol a _Bounded wraps (what the caller of `connect` expects)."""
    return wrapper.wrappedProtocol


class _NoCookies(IndexableCookieJar):
    """Receivers' cookies are never kept (nor sent to another receiver)."""

    def set_cookie(self, cookie: Cookie) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


def _GuardedEndpoint(reactor: Any, policy: AddressPolicy, uri: URI,
                     timeout: float) -> IStreamClientEndpoint:
    """The endpoint of one delivery: only to addresses the policy allows (checked after
    resolution, so DNS cannot point an accepted name at a forbidden address), TLS for https."""
    host = uri.host.decode("ascii").strip("[]")
    endpoint: IStreamClientEndpoint = GuardedEndpoint(
        reactor, policy, host, uri.port, timeout,
        refusal=REFUSAL,
    )
    if uri.scheme == b"https":
        endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
    return _BoundedEndpoint(endpoint, MAX_ANSWER_BYTES)


class _GuardedEndpointFactory:
    def __init__(self, reactor: Any, policy: AddressPolicy, timeout: float) -> None:
        self.reactor = reactor
        self.policy = policy
        self.timeout = timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return _GuardedEndpoint(self.reactor, self.policy, uri, self.timeout)


def guarded_http_client(reactor: Any, policy: AddressPolicy, timeout: float) -> Any:
    """A treq HTTPClient whose connections go only where `policy` allows; no connection
    pooling, no cookies, request bodies written without the global cooperator."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent.usingEndpointFactory(
        reactor, _GuardedEndpointFactory(reactor, policy, timeout), pool=pool
    )
    return HTTPClient(agent, cookiejar=_NoCookies(), data_to_body_producer=_BytesProducer)
