"""What the daemon clients share: addresses, endpoints, deadlines and a one-shot exchange.

spamd and clamd both speak "connect, send one request, read one reply, close"; `Exchange`
is that protocol with a bounded reply buffer and a Deferred that can be cancelled (which
aborts the connection). `run_exchange` connects through an endpoint and applies the
client's deadline with the injected clock, turning every failure into a `FilterError`.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
)
from twisted.internet.interfaces import (
    IProtocolFactory,
    IReactorFDSet,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from filters.interface import FilterError, FilterTimeout

T = TypeVar("T")


@dataclass(frozen=True)
class Address:
    """Where a daemon listens: a TCP host and port, or a unix socket path."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return self.path
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def parse_address(value: str, default_port: int | None = None) -> Address:
    """Parse `host:port`, `[v6]:port`, `unix:/path` or `/path` (a unix socket).

    Raises ValueError with a one-line message on anything else.
    """
    text = value.strip()
    if text.startswith("unix:"):
        text = text[len("unix:"):]
        if not text:
            raise ValueError(f"empty unix socket path in {value!r}")
        return Address(path=text)
    if text.startswith("/"):
        return Address(path=text)
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"bad address {value!r}: missing ]")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad address {value!r}")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError(f"bad address {value!r}: write IPv6 addresses as [addr]:port")
    if not host:
        raise ValueError(f"bad address {value!r}: no host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"bad address {value!r}: no port")
        return Address(host=host, port=default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad address {value!r}: bad port {port_text!r}")
    return Address(host=host, port=int(port_text))


def client_endpoint(reactor: Any, address: Address, timeout: float) -> IStreamClientEndpoint:
    """A client endpoint for `address`: unix socket, IP literal (connects at once, no
    resolver thread), or a host name (HostnameEndpoint resolves it)."""
    if address.path:
        return UNIXClientEndpoint(reactor, address.path, timeout=timeout)
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    if ip.version == 6:
        return TCP6ClientEndpoint(reactor, address.host, address.port, timeout=timeout)
    return TCP4ClientEndpoint(reactor, address.host, address.port, timeout=timeout)


def direct_endpoint(reactor: Any, address: Address, timeout: float) -> IStreamClientEndpoint:
    """`client_endpoint`, but for an IP literal a `DirectTCPEndpoint` (when the reactor
    watches file descriptors): the lighter connection for a daemon asked once per
    connection (rspamd)."""
    if address.path or not IReactorFDSet.providedBy(reactor):
        return client_endpoint(reactor, address, timeout)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        return client_endpoint(reactor, address, timeout)
    return DirectTCPEndpoint(reactor, address, timeout)


@implementer(IStreamClientEndpoint)
class DirectTCPEndpoint:
    """A TCP client endpoint to an IP literal over a plain non-blocking socket that the
    reactor watches (IReactorFDSet), for exchanges of one request and one reply.

    rspamd closes its connection after every reply, so each scan pays for a connection;
    through connectTCP that was a connector, a client transport with its address
    resolution and connect timer, an endpoint's wrapping factory and protocol, and after
    the reply another reactor turn to flush an empty buffer before the close: more CPU
    than the rest of the client side of a scan. Here a connection is the socket, one
    object that is its transport and its reactor descriptor, and nothing else. On
    loopback the connect completes within `connect_ex`, and the connection is made (the
    request written) at once; otherwise the socket waits to be writable, for at most
    `timeout` seconds (the one timer, only then).

    The transport has what an `Exchange` uses: `write` (sent at once, the rest when the
    socket takes it), `loseConnection` (the socket closed at once, unless a write is still
    going on, and the protocol's `connectionLost` called before it returns) and
    `abortConnection` (closed at once, `connectionLost` in the next reactor turn, as
    Twisted's transports do). No TLS, no producers."""

    def __init__(self, reactor: Any, address: Address, timeout: float) -> None:
        self.reactor = reactor
        self.address = address
        self.timeout = timeout
        ip = ipaddress.ip_address(address.host)
        self.family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        # A v6 literal's scope (fe80::1%eth0) needs the numeric lookup, which asks no one.
        self.sockaddr: Any = socket.getaddrinfo(
            address.host, address.port, self.family, socket.SOCK_STREAM, 0,
            socket.AI_NUMERICHOST)[0][4]
        self.peer = (IPv6Address("TCP", address.host, address.port) if ip.version == 6
                     else IPv4Address("TCP", address.host, address.port))

    def connect(self, factory: IProtocolFactory) -> defer.Deferred[Any]:
        try:
            sock = socket.socket(self.family, socket.SOCK_STREAM)
        except OSError as e:  # no descriptor left (EMFILE): a failed connection, as Twisted's
            return defer.fail(error.ConnectBindError(e.errno, e.strerror))
        sock.setblocking(False)
        code = sock.connect_ex(self.sockaddr)
        if code in (0, errno.EISCONN):
            return self._made(sock, factory)
        if code not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY):
            sock.close()
            return defer.fail(_connect_error(code))
        try:
            sock.getpeername()  # connected already (loopback): no waiting
        except OSError:
            return _Connecting(self, sock, factory).done
        return self._made(sock, factory)

    def _made(self, sock: socket.socket, factory: IProtocolFactory) -> defer.Deferred[Any]:
        try:
            protocol = factory.buildProtocol(self.peer)
            if protocol is None:
                raise error.NoProtocol()
        except BaseException:
            sock.close()
            return defer.fail()
        DirectTransport(self.reactor, sock, protocol, self.peer)
        return defer.succeed(protocol)


def _connect_error(code: int) -> Exception:
    """The connect error of errno `code`, as Twisted's connectTCP reports it."""
    return error.getConnectError((code, os.strerror(code)))


class _Connecting:
    """A connect still in progress: the socket waits to be writable, at most `timeout`
    seconds; cancelling the Deferred closes it (ConnectingCancelledError, as Twisted's)."""

    def __init__(self, endpoint: DirectTCPEndpoint, sock: socket.socket,
                 factory: IProtocolFactory) -> None:
        self.endpoint = endpoint
        self.sock = sock
        self.fd = sock.fileno()
        self.factory = factory
        self.done: defer.Deferred[Any] = defer.Deferred(self._cancel)
        self.timer = endpoint.reactor.callLater(endpoint.timeout, self._fail,
                                                error.TimeoutError())
        endpoint.reactor.addWriter(self)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "DirectTCPEndpoint"

    def doWrite(self) -> None:
        code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._fail(_connect_error(code))
            return
        self._stop()
        self.endpoint._made(self.sock, self.factory).chainDeferred(self.done)

    def connectionLost(self, reason: Failure) -> None:
        """From the reactor: an epoll reactor tells a connect that failed (EPOLLERR and
        EPOLLHUP on a descriptor it does not read) so, never calling doWrite; the
        socket's error says why (refused, unreachable), as doWrite reads it."""
        code = 0 if self.done.called else self.sock.getsockopt(socket.SOL_SOCKET,
                                                                socket.SO_ERROR)
        self._fail(_connect_error(code) if code else error.ConnectError(
            string=str(reason.value)))

    def _fail(self, why: Exception) -> None:
        if self.done.called:
            return
        self._stop()
        self.sock.close()
        self.fd = -1  # (as DirectTransport._shut)
        self.done.errback(Failure(why))

    def _stop(self) -> None:
        if self.timer.active():
            self.timer.cancel()
        self.endpoint.reactor.removeWriter(self)

    def _cancel(self, d: defer.Deferred[Any]) -> None:
        self._fail(error.ConnectingCancelledError(self.endpoint.peer))


class DirectTransport:
    """A connected socket as the protocol's transport and as the reactor's descriptor
    (see DirectTCPEndpoint)."""

    READ_SIZE = 65536

    def __init__(self, reactor: Any, sock: socket.socket, protocol: Any, peer: Any) -> None:
        self.reactor = reactor
        self.sock = sock
        self.fd = sock.fileno()
        self.protocol = protocol
        self.peer = peer
        self.unsent: bytes | memoryview = b""  # what the socket did not take yet
        self.disconnecting = False
        self.closed = False
        self.broken: BaseException | None = None  # a send failed: the connection is lost
        reactor.addReader(self)
        protocol.makeConnection(self)

    # -- the reactor's descriptor ---------------------------------------------------------

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "DirectTransport"

    def doRead(self) -> None:
        try:
            data = self.sock.recv(self.READ_SIZE)
        except BlockingIOError:
            return
        except OSError as e:
            self._close(error.ConnectionLost(str(e)))
            return
        if not data:
            self._close(error.ConnectionDone())
            return
        self.protocol.dataReceived(data)

    def doWrite(self) -> None:
        if self.broken is not None:
            self._close(error.ConnectionLost(str(self.broken)))
            return
        self._send()
        if not self.unsent:
            self.reactor.removeWriter(self)
            if self.disconnecting:
                self._close(error.ConnectionDone())

    def connectionLost(self, reason: Failure) -> None:
        """From the reactor (its shutdown, or an error it caught in doRead or doWrite)."""
        self._close(reason.value if reason.value is not None else error.ConnectionLost())

    # -- the protocol's transport ---------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed or self.disconnecting or not data:
            return
        if self.unsent:
            self.unsent = bytes(self.unsent) + data
            return
        self.unsent = data
        self._send()
        if self.unsent or self.broken is not None:
            self.reactor.addWriter(self)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.closed:
            return
        self.disconnecting = True
        if not self.unsent:
            self._close(error.ConnectionDone())

    def abortConnection(self) -> None:
        if self.closed:
            return
        self._shut()
        self.reactor.callLater(0, self._lost, error.ConnectionAborted())

    def getPeer(self) -> Any:
        return self.peer

    def getHost(self) -> Any:
        host, port = self.sock.getsockname()[:2]
        return type(self.peer)("TCP", host, port)

    # -- internals ------------------------------------------------------------------------

    def _send(self) -> None:
        try:
            sent = self.sock.send(self.unsent)
        except BlockingIOError:
            return
        except OSError as e:
            self.broken = e
            self.unsent = b""
            return
        self.unsent = memoryview(self.unsent)[sent:] if sent < len(self.unsent) else b""

    def _shut(self) -> None:
        """Close the socket (once), its descriptor out of the reactor first."""
        if self.closed:
            return
        self.closed = True
        self.disconnecting = True
        self.unsent = b""
        self.reactor.removeReader(self)
        self.reactor.removeWriter(self)
        self.sock.close()
        # Its number may be a new socket's from now on: a late removeReader (the reactor
        # tidying after an error) must not take that one's place in the reactor.
        self.fd = -1

    def _close(self, reason: BaseException) -> None:
        if self.closed:
            return
        self._shut()
        self._lost(reason)

    def _lost(self, reason: BaseException) -> None:
        self.protocol.connectionLost(Failure(reason))


async def with_deadline(
    filter_name: str,
    clock: IReactorTime,
    timeout: float | None,  # noqa: ASYNC109 (Twisted clock, not asyncio)
    work: Coroutine[Any, Any, T],
) -> T:
    """Await `work`, cancelling it after `timeout` seconds of `clock` (FilterTimeout)."""
    return await deadline(filter_name, clock, timeout, defer.Deferred.fromCoroutine(work))


def deadline(
    filter_name: str, clock: IReactorTime, timeout: float | None, d: defer.Deferred[T],
) -> defer.Deferred[T]:
    """`d`, cancelled after `timeout` seconds of `clock` (then failing with FilterTimeout):
    `with_deadline` for work that is a Deferred already (no coroutine to drive)."""
    # Inline work is done: no deadline. Work called but paused waits for a Deferred it
    # was chained to (an exchange on a connection made at once) and gets one.
    if timeout is not None and timeout > 0 and (not d.called or d.paused):

        def timed_out(result: Any, seconds: float) -> Any:
            # However the cancelled work failed (CancelledError, an HTTP client's
            # ResponseNeverReceived, ...), the reason is the deadline.
            if isinstance(result, Failure):
                raise FilterTimeout(filter_name, f"no answer within {seconds:g} s")
            return result

        d.addTimeout(timeout, clock, onTimeoutCancel=timed_out)
    return d


class ProtocolViolation(Exception):
    """The peer's reply breaks the protocol (garbage, too large, cut short)."""


class Exchange(Protocol):
    """Send one request, collect one reply (at most `max_reply` bytes), report it.

    Subclasses implement `send` (write the request) and `reply_complete(buffer, closed)`
    which returns the parsed reply once it is complete (None to keep reading) or raises
    ProtocolViolation. `done` fires with the parsed reply; cancelling it aborts the
    connection.
    """

    def __init__(self, max_reply: int) -> None:
        self.max_reply = max_reply
        self.buffer = bytearray()
        self.done: defer.Deferred[Any] = defer.Deferred(self._cancel)

    # -- for subclasses -------------------------------------------------------------------

    def send(self) -> None:
        raise NotImplementedError

    def reply_complete(self, buffer: bytes, closed: bool) -> Any | None:
        raise NotImplementedError

    def stopped(self) -> None:
        """Called when the exchange ends (maybe more than once: keep it idempotent), for
        subclasses that are still producing data."""

    # -- Protocol -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.send()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.buffer += data
        if len(self.buffer) > self.max_reply:
            self._finish(Failure(ProtocolViolation(
                f"reply larger than {self.max_reply} bytes")))
            self._abort()
            return
        try:
            reply = self.reply_complete(bytes(self.buffer), closed=False)
        except Exception as e:
            self._finish(_violation(e))
            self._abort()
            return
        if reply is not None:
            self._finish(reply)
            transport: Any = self.transport
            transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            self.stopped()
            return
        try:
            reply = self.reply_complete(bytes(self.buffer), closed=True)
        except Exception as e:
            self._finish(_violation(e))
            return
        if reply is None:
            what = "before replying" if not self.buffer else "in the middle of the reply"
            self._finish(Failure(ProtocolViolation(f"connection closed {what}")))
        else:
            self._finish(reply)

    # -- internals ------------------------------------------------------------------------

    def _finish(self, result: Any) -> None:
        if not self.done.called:
            self.stopped()
            if isinstance(result, Failure):
                self.done.errback(result)
            else:
                self.done.callback(result)

    def _abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def _cancel(self, d: defer.Deferred[Any]) -> None:
        self.stopped()
        self._abort()


class RequestExchange(Exchange):
    """An exchange whose request is one block of bytes, written when connected."""

    def __init__(self, request: bytes, max_reply: int) -> None:
        super().__init__(max_reply)
        self.request = request

    def send(self) -> None:
        transport: Any = self.transport
        transport.write(self.request)


def run_exchange(
    filter_name: str,
    endpoint: IStreamClientEndpoint,
    address: Address,
    make_protocol: Callable[[], Exchange],
) -> defer.Deferred[Any]:
    """Connect, run one Exchange, fire with its parsed reply; failures become FilterError.
    One Deferred chain (connect, then the exchange's `done`): no coroutine to drive.
    Cancelling it cancels the connection attempt or, once connected, the exchange."""
    # Not connectProtocol: it builds a factory class per call (zope.interface work that
    # cost more than the rest of a scan's client side).
    d: defer.Deferred[Any] = endpoint.connect(_OneProtocol(make_protocol()))
    d.addCallbacks(_exchange_done, _connect_failed, errbackArgs=(filter_name, address))
    d.addErrback(_bad_reply, filter_name, address)
    return d


def _exchange_done(proto: Exchange) -> defer.Deferred[Any]:
    return proto.done


def _connect_failed(failure: Failure, filter_name: str, address: Address) -> Failure:
    if failure.check(error.ConnectingCancelledError):
        # A cancelled connection attempt (our deadline): report it as the cancellation it
        # is, so that the deadline turns it into FilterTimeout.
        raise defer.CancelledError()
    if failure.check(error.ConnectError, error.DNSLookupError, OSError):
        reason: Any = failure.value
        raise FilterError(filter_name, f"cannot connect to {address}: {_why(reason)}")
    return failure


def _bad_reply(failure: Failure, filter_name: str, address: Address) -> Failure:
    if failure.check(ProtocolViolation):
        raise FilterError(filter_name, f"bad reply from {address}: {failure.value}")
    return failure


class _OneProtocol(Factory):
    """A factory that hands out one given protocol (what connectProtocol makes per call)."""

    # No "Starting factory" / "Stopping factory" events: two a scan, each formatted and
    # passed through every log observer before the log's filter dropped them.
    noisy = False

    def __init__(self, protocol: Exchange) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Exchange:
        return self.protocol_instance


def _violation(e: Exception) -> Failure:
    """A parser's exception as the exchange's failure: a ProtocolViolation as it is, any
    other (int() of a 5,000-digit or a non-ASCII number, ...) as a ProtocolViolation naming
    it, so a garbled reply fails the exchange at once rather than escaping from
    dataReceived and leaving the scan to its deadline."""
    if isinstance(e, ProtocolViolation):
        return Failure(e)
    return Failure(ProtocolViolation(f"unreadable reply ({type(e).__name__}: {_why(e)[:120]})"))


def _why(e: BaseException) -> str:
    text = str(e).strip()
    return text or type(e).__name__
