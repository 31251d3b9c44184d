"""The daemon's HTTP client for rspamd (OneShotHTTP): the one request it writes on a fresh
connection and the replies it reads, fed raw bytes over a MemoryReactor and a
StringTransport (the real rspamd is in tests/test_filters_rspamd.py); and over
DirectTCPEndpoint, the plain socket it asks rspamd at an IP literal through."""

from __future__ import annotations

import errno
import json
import socket
import sys
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import TestCase

from filters import _net
from filters._net import Address, DirectTCPEndpoint, DirectTransport
from filters.interface import FilterError, FilterTimeout, ScanContext, Verdict
from filters.rspamd import OneShotHTTP, RspamdClient, make_http_client

REPLY = json.dumps({"action": "reject", "score": 15.5, "required_score": 15.0,
                    "symbols": {"GTUBE": {"score": 15.0}}}).encode()
MESSAGE = b"Subject: x\r\n\r\nhi\r\n"


class OneShotHTTPTests(TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", 11333)
        http = OneShotHTTP(endpoint, Address("127.0.0.1", 11333), max_reply=4096)
        self.client = RspamdClient(http, self.reactor, url="http://127.0.0.1:11333",
                                   timeout=5.0)

    def scan(self, context: ScanContext | None = None) -> defer.Deferred[Verdict]:
        return defer.Deferred.fromCoroutine(self.client.scan(MESSAGE, context))

    def connect(self, index: int = 0) -> tuple[Any, StringTransport]:
        """The connection the client opened, made over a StringTransport."""
        _host, _port, factory, _timeout, _bind = self.reactor.tcpClients[index]
        protocol: Any = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_one_write_with_the_envelope_then_the_reply_by_content_length(self) -> None:
        d = self.scan(ScanContext(mail_from="a@x.test", recipients=("b@y.test", "c@y.test"),
                                  queue_id="Q1"))
        protocol, transport = self.connect()
        head, _, body = transport.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.assertEqual(lines[:4], [b"POST /checkv2 HTTP/1.1", b"Host: 127.0.0.1:11333",
                                     b"Connection: close", b"Content-Length: 18"])
        self.assertEqual(sorted(lines[4:]), [b"From: a@x.test", b"Queue-Id: Q1",
                                             b"Rcpt: b@y.test", b"Rcpt: c@y.test"])
        self.assertEqual(body, MESSAGE)
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d"
                              b"\r\n\r\n" % len(REPLY) + REPLY[:10])
        self.assertNoResult(d)
        protocol.dataReceived(REPLY[10:])
        verdict = self.successResultOf(d)
        self.assertTrue(verdict.spam)
        self.assertEqual(verdict.symbol_names, ("GTUBE",))
        self.assertTrue(transport.disconnecting)  # we close once the reply is in

    def test_a_chunked_reply(self) -> None:
        d = self.scan()
        protocol, _transport = self.connect()
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                          for part in (REPLY[:7], REPLY[7:])) + b"0\r\n\r\n"
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(len(chunks)):  # one octet at a time
            protocol.dataReceived(chunks[i:i + 1])
        self.assertEqual(self.successResultOf(d).score, 15.5)

    def test_a_reply_in_many_reads_is_parsed_once(self) -> None:
        # Each read parsed the header and every chunk so far again: work that grew with the
        # square of the reads, on the reactor thread. Counted here in bytes.find calls (the
        # search for each line's end) over one-octet chunks, one read each.
        d = self.scan()
        protocol, _transport = self.connect()
        reads = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
        reads += [b"1\r\n%c\r\n" % octet for octet in REPLY] + [b"0\r\n\r\n"]
        finds = 0

        def count(_frame: Any, event: str, arg: Any) -> None:
            nonlocal finds
            if event == "c_call" and getattr(arg, "__name__", "") == "find":
                finds += 1

        sys.setprofile(count)
        try:
            for data in reads:
                protocol.dataReceived(data)
        finally:
            sys.setprofile(None)
        self.assertEqual(self.successResultOf(d).score, 15.5)
        self.assertLess(finds, 3 * len(reads))

    def test_a_reply_ended_by_the_close(self) -> None:
        d = self.scan()
        protocol, _transport = self.connect()
        protocol.dataReceived(b"HTTP/1.0 200 OK\r\n\r\n" + REPLY)
        self.assertNoResult(d)
        protocol.connectionLost(None)
        self.assertEqual(self.successResultOf(d).score, 15.5)

    def test_an_http_error_is_a_filter_error(self) -> None:
        d = self.scan()
        protocol, _transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 500 Internal\r\nContent-Length: 4\r\n\r\noops")
        self.assertIn("HTTP 500", self.failureResultOf(d, FilterError).value.reason)

    def test_garbage_and_cut_replies_are_filter_errors(self) -> None:
        for reply, closed in ((b"SSH-2.0-OpenSSH\r\n\r\n", False),
                              (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", False),
                              (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n{}", True),
                              (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                               False),
                              (b"HTTP/1.1 200 OK\r\nContent-", True)):
            index = len(self.reactor.tcpClients)
            d = self.scan()
            protocol, _transport = self.connect(index)
            protocol.dataReceived(reply)
            if closed:
                protocol.connectionLost(None)
            self.failureResultOf(d, FilterError)

    def test_a_chunk_size_that_is_not_hex_digits_is_refused(self) -> None:
        # int(text, 16) also reads a sign, "0x" and "_": "-2" was taken as an empty chunk
        # (the chunks after it made a verdict) and "-6" sent the parser back to the same
        # size line for ever, on the reactor thread, its list of chunks growing.
        whole = b"%x\r\n%s\r\n0\r\n\r\n" % (len(REPLY), REPLY)
        for size in (b"-2", b"+0", b"0x0", b"0_0", b"-6", b"-4"):
            index = len(self.reactor.tcpClients)
            d = self.scan()
            protocol, transport = self.connect(index)
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  + size + b"\r\n" + whole)
            reason = self.failureResultOf(d, FilterError).value.reason
            self.assertIn("bad chunk size", reason)
            self.assertTrue(transport.disconnecting)

    def test_a_content_length_int_cannot_read_is_a_filter_error_at_once(self) -> None:
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", 11333)
        http = OneShotHTTP(endpoint, Address("127.0.0.1", 11333), max_reply=16384)
        self.client = RspamdClient(http, self.reactor, url="http://127.0.0.1:11333",
                                   timeout=5.0)
        d = self.scan()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: " + b"0" * 5000
                              + b"2\r\n\r\n{}")
        self.assertIn("unreadable reply (ValueError",
                      self.failureResultOf(d, FilterError).value.reason)
        self.assertTrue(transport.disconnecting)

    def test_a_reply_over_the_limit_is_refused_and_the_connection_dropped(self) -> None:
        d = self.scan()
        protocol, transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9000\r\n\r\n" + b"x" * 5000)
        self.failureResultOf(d, FilterError)
        self.assertTrue(transport.disconnecting)

    def test_a_silent_rspamd_times_out(self) -> None:
        d = self.scan()
        _protocol, transport = self.connect()
        self.reactor.advance(5.0)
        self.failureResultOf(d, FilterTimeout)
        self.assertTrue(transport.disconnecting)

    def test_the_envelope_lines_are_those_of_request_headers(self) -> None:
        # The daemon's path writes the envelope without a Headers object per scan; what it
        # writes is what the treq path's request_headers gives, name for name, in order.
        from filters.rspamd import header_lines, request_headers

        context = ScanContext(mail_from="a@x.test", recipients=("b@y.test", "c\r\n@y.test"),
                              client_ip="192.0.2.1", helo="h\0elo", hostname="mx.x.test",
                              queue_id="Q1", user="u")
        expected = b"".join(name + b": " + value + b"\r\n" for name, values
                            in request_headers(context).getAllRawHeaders() for value in values)
        self.assertEqual(header_lines(context), expected)
        self.assertEqual(header_lines(ScanContext(queue_id="Q2")), b"Queue-Id: Q2\r\n")
        self.assertEqual(header_lines(None), b"")

    def test_a_scan_builds_no_headers_object_nor_response(self) -> None:
        # Per scan the client built a twisted Headers (then read it back into bytes) and a
        # response object whose body went through a protocol and a Failure(ResponseDone):
        # CPU on the reactor thread for every message, for nothing the scan needs.
        import filters.rspamd as rspamd

        def refused(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("built per scan")

        self.patch(rspamd, "Headers", refused)
        self.patch(rspamd, "_Reply", refused)
        d = self.scan(ScanContext(mail_from="a@x.test", queue_id="Q1"))
        protocol, _transport = self.connect()
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(REPLY)
                              + REPLY)
        self.assertTrue(self.successResultOf(d).spam)


class Listener:
    """A blocking loopback listener of the test's own: the rspamd end of a real socket."""

    def __init__(self, test: TestCase) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(5)
        self.port = self.sock.getsockname()[1]
        test.addCleanup(self.sock.close)
        self.test = test

    def accept(self) -> socket.socket:
        peer, _ = self.sock.accept()
        peer.settimeout(5)
        self.test.addCleanup(peer.close)
        return peer


def read_request(peer: socket.socket) -> bytes:
    """One request with a Content-Length body, whole."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += peer.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += peer.recv(65536)
    return head + b"\r\n\r\n" + body


class DirectConnectionTests(TestCase):
    """rspamd at an IP literal is asked over DirectTCPEndpoint: a plain socket the reactor
    watches (here a MemoryReactorClock, driven by hand), the other end a real loopback
    listener of the test's own."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def client(self, port: int, timeout: float = 5.0) -> RspamdClient:
        http, _pool = make_http_client(self.reactor, Address("127.0.0.1", port), timeout,
                                       max_reply=4096)
        return RspamdClient(http, self.reactor, url=f"http://127.0.0.1:{port}",
                            timeout=timeout)

    def transport(self) -> DirectTransport:
        (transport,) = [r for r in self.reactor.readers if isinstance(r, DirectTransport)]
        return transport

    def read_all(self, transport: DirectTransport) -> None:
        """What the reactor does while the socket is readable, until it is closed."""
        for _ in range(100):
            if transport.closed:
                return
            transport.doRead()
        raise AssertionError("the connection was never closed")

    def test_a_scan_is_a_socket_of_its_own_not_a_connector(self) -> None:
        # Through connectTCP each scan built a connector, a client transport resolving its
        # address, a connect timer and an endpoint's wrappers, and flushed an empty buffer
        # in another reactor turn before the close: more CPU than the rest of the scan.
        listener = Listener(self)
        client = self.client(listener.port)
        self.assertIsInstance(client.http.endpoint, DirectTCPEndpoint)
        d = defer.Deferred.fromCoroutine(client.scan(MESSAGE, ScanContext(queue_id="Q1")))
        self.assertEqual(self.reactor.tcpClients, [])
        peer = listener.accept()
        request = read_request(peer)  # written at once: the loopback connect is immediate
        self.assertTrue(request.startswith(b"POST /checkv2 HTTP/1.1\r\n"))
        self.assertIn(b"\r\nQueue-Id: Q1\r\n", request)
        self.assertTrue(request.endswith(b"\r\n\r\n" + MESSAGE))
        transport = self.transport()
        self.assertEqual(self.reactor.writers, set())  # all sent, nothing to watch for
        peer.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                     % len(REPLY) + REPLY)
        self.read_all(transport)
        self.assertTrue(self.successResultOf(d).spam)
        self.assertEqual(transport.sock.fileno(), -1)  # closed
        self.assertEqual(transport.fileno(), -1)
        self.assertEqual((self.reactor.readers, self.reactor.writers), (set(), set()))
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        peer.settimeout(5)
        self.assertEqual(peer.recv(10), b"")  # our side closed it

    def test_a_reply_cut_short_is_a_filter_error(self) -> None:
        listener = Listener(self)
        d = defer.Deferred.fromCoroutine(self.client(listener.port).scan(MESSAGE))
        peer = listener.accept()
        read_request(peer)
        peer.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n" + REPLY[:20])
        peer.close()
        self.read_all(self.transport())
        reason = self.failureResultOf(d, FilterError).value.reason
        self.assertIn("connection closed in the middle of the body", reason)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_nothing_listening_is_cannot_reach(self) -> None:
        listener = Listener(self)
        port = listener.port
        listener.sock.close()
        d = defer.Deferred.fromCoroutine(self.client(port).scan(MESSAGE))
        for connecting in list(self.reactor.writers):  # (if the refusal came later)
            connecting.doWrite()
        reason = self.failureResultOf(d, FilterError).value.reason
        self.assertIn(f"cannot reach http://127.0.0.1:{port}", reason)
        self.assertIn("refused", reason)
        self.assertEqual((self.reactor.readers, self.reactor.writers), (set(), set()))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_silent_rspamd_times_out_and_the_socket_is_closed(self) -> None:
        listener = Listener(self)
        d = defer.Deferred.fromCoroutine(self.client(listener.port).scan(MESSAGE))
        peer = listener.accept()
        read_request(peer)
        transport = self.transport()
        self.reactor.advance(5.0)
        self.failureResultOf(d, FilterTimeout)
        self.assertTrue(transport.closed)
        self.assertEqual((self.reactor.readers, self.reactor.writers), (set(), set()))
        self.reactor.advance(0)  # the protocol hears of the abort in the next turn
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(peer.recv(10), b"")

    def test_a_connect_in_progress_waits_for_the_socket_to_be_writable(self) -> None:
        sockets = self.pending_sockets()
        d = defer.Deferred.fromCoroutine(self.client(11333).scan(MESSAGE))
        (connecting,) = self.reactor.writers
        self.assertEqual(self.reactor.readers, set())
        sockets[0].connected = True
        connecting.doWrite()
        self.assertIn(b"POST /checkv2 ", sockets[0].sent)
        (transport,) = self.reactor.readers
        self.assertIsInstance(transport, DirectTransport)
        sockets[0].replies.append(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                  % len(REPLY) + REPLY)
        transport.doRead()
        self.assertTrue(self.successResultOf(d).spam)
        self.assertTrue(sockets[0].closed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])  # the connect timer too

    def test_a_connect_that_never_completes_times_out(self) -> None:
        sockets = self.pending_sockets()
        d = defer.Deferred.fromCoroutine(self.client(11333, timeout=3.0).scan(MESSAGE))
        (connecting,) = self.reactor.writers
        self.reactor.advance(3.0)
        # The connect timeout (Twisted's message), armed before the scan's deadline.
        self.assertIn("timeout", self.failureResultOf(d, FilterError).value.reason)
        self.assertTrue(sockets[0].closed)
        self.assertEqual(connecting.fileno(), -1)
        self.assertEqual(self.reactor.writers, set())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_refusal_found_once_writable_is_cannot_reach(self) -> None:
        sockets = self.pending_sockets()
        d = defer.Deferred.fromCoroutine(self.client(11333).scan(MESSAGE))
        (connecting,) = self.reactor.writers
        sockets[0].error = errno.ECONNREFUSED
        connecting.doWrite()
        self.assertIn("Connection refused", self.failureResultOf(d, FilterError).value.reason)
        self.assertTrue(sockets[0].closed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_a_refusal_the_epoll_reactor_reports_is_cannot_reach_refused(self) -> None:
        """Linux tells an asynchronous refusal (a remote rspamd, or loopback where the
        connect did not end within connect_ex) as EPOLLOUT|EPOLLERR|EPOLLHUP; on a
        descriptor it does not read, Twisted's epoll reactor then calls connectionLost
        (CONNECTION_LOST), never doWrite. The socket's error says why: "refused", as
        connectTCP's transport (which reads while connecting) said, not "Connection was
        lost in a non-clean fashion". Dispatched by an EPollReactor of the test's own."""
        import select

        from twisted.internet.epollreactor import EPollReactor

        epoll: Any = EPollReactor()
        self.addCleanup(epoll._poller.close)
        self.addCleanup(epoll.waker.connectionLost, None)
        sockets = self.pending_sockets()
        d = defer.Deferred.fromCoroutine(self.client(11333).scan(MESSAGE))
        (connecting,) = self.reactor.writers
        sockets[0].error = errno.ECONNREFUSED
        epoll._doReadOrWrite(connecting, connecting.fileno(),
                             select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP)
        reason = self.failureResultOf(d, FilterError).value.reason
        self.assertIn("cannot reach http://127.0.0.1:11333", reason)
        self.assertIn("Connection refused", reason)
        self.assertTrue(sockets[0].closed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_no_descriptor_left_is_cannot_reach(self) -> None:
        """A process out of descriptors (EMFILE: the moment many scans are in flight):
        connectTCP's client said "Couldn't bind: 24" through the Deferred; socket() raised
        out of DirectTCPEndpoint.connect instead, an OSError out of the scan that the
        chain took for a filter's bug (its traceback logged each message)."""

        def no_descriptor(*args: Any) -> Any:
            raise OSError(errno.EMFILE, "Too many open files")

        self.patch(_net.socket, "socket", no_descriptor)
        d = defer.Deferred.fromCoroutine(self.client(11333).scan(MESSAGE))
        reason = self.failureResultOf(d, FilterError).value.reason
        self.assertIn("cannot reach http://127.0.0.1:11333", reason)
        self.assertIn("Too many open files", reason)

    def test_a_request_the_socket_takes_in_parts_is_sent_whole_in_order(self) -> None:
        sockets = self.pending_sockets(connected=True, send_at_most=7)
        d = defer.Deferred.fromCoroutine(self.client(11333).scan(MESSAGE))
        (transport,) = self.reactor.writers
        while transport in self.reactor.writers:
            transport.doWrite()
        self.assertTrue(sockets[0].sent.endswith(b"\r\n\r\n" + MESSAGE))
        self.assertTrue(sockets[0].sent.startswith(b"POST /checkv2 HTTP/1.1\r\n"))
        sockets[0].replies.append(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"
                                  % len(REPLY) + REPLY)
        transport.doRead()
        self.assertTrue(self.successResultOf(d).spam)

    def pending_sockets(self, *, connected: bool = False,
                        send_at_most: int = 1 << 20) -> list[FakeSocket]:
        """Sockets the endpoint makes from now on: FakeSockets, connecting until told."""
        made: list[FakeSocket] = []

        def make(*args: Any) -> FakeSocket:
            made.append(FakeSocket(connected, send_at_most))
            return made[-1]

        self.patch(_net.socket, "socket", make)
        return made


class FakeSocket:
    """A non-blocking socket whose connect is in progress until `connected` is set."""

    def __init__(self, connected: bool, send_at_most: int) -> None:
        self.connected = connected
        self.send_at_most = send_at_most
        self.error = 0
        self.sent = b""
        self.replies: list[bytes] = []
        self.closed = False

    def setblocking(self, flag: bool) -> None:
        assert not flag

    def connect_ex(self, address: Any) -> int:
        return 0 if self.connected else errno.EINPROGRESS

    def getpeername(self) -> Any:
        if not self.connected:
            raise OSError(errno.ENOTCONN, "not connected")
        return ("127.0.0.1", 11333)

    def getsockopt(self, level: int, name: int) -> int:
        return self.error

    def fileno(self) -> int:
        return -1 if self.closed else 99

    def send(self, data: Any) -> int:
        if not self.connected:
            raise BlockingIOError()
        part = bytes(data[:self.send_at_most])
        self.sent += part
        return len(part)

    def recv(self, size: int) -> bytes:
        if self.replies:
            return self.replies.pop(0)
        raise BlockingIOError()

    def close(self) -> None:
        self.closed = True


class ClosedDescriptorTests(TestCase):
    def test_a_late_remove_of_a_closed_connection_leaves_its_numbers_new_socket(self) -> None:
        # The reactor finds a descriptor by its fileno(): once the socket is closed its
        # number may be a new connection's, which a late removeReader of the old one (the
        # reactor tidying after an error it caught) must leave registered. A reactor of
        # the test's own, never run.
        from twisted.internet.epollreactor import EPollReactor

        reactor: Any = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        left, right = socket.socketpair()
        self.addCleanup(right.close)
        number = left.fileno()
        old = DirectTransport(reactor, left, Protocol(), None)
        old.loseConnection()
        newcomer, other = socket.socketpair()
        self.addCleanup(newcomer.close)
        self.addCleanup(other.close)
        self.assertEqual(newcomer.fileno(), number)  # the number is the new socket's
        new = DirectTransport(reactor, newcomer, Protocol(), None)
        reactor.removeReader(old)
        self.assertIn(new, reactor.getReaders())
        reactor.removeReader(new)
