"""The request-size limit: 413 in each API's shape, decided before the body is stored.

StubTreq hands the root a fully received body, so it shows the shapes only. The streaming
behaviour is driven byte by byte through the real Site and channel on a StringTransport,
and once end to end over a loopback socket.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import time
from typing import Any

from treq.client import HTTPClient
from twisted.internet import threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import INegotiated, IPushProducer, ISSLTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import directlyProvides, implementer

from mailcore.config import Config
from tests.support.reactor import get_reactor
from tests.support.servers import sleep
from tests.support.web import PASSWORD, Web, make_core
from web.limits import (
    LINGER_SECONDS,
    REFUSED_LINGER_SECONDS,
    LimitedChannel,
    LimitedRequest,
    _unsent,
)
from web.root import MailcoreSite, build_root, build_site
from web.settings import WebSettings

MAX = 1000


class ShapeTests(TestCase):
    async def test_each_api_answers_413_in_its_shape(self) -> None:
        web = Web.build(Config(http_max_body=MAX))
        big = b"x" * (MAX + 1)
        cases: list[tuple[str, str, Any]] = [
            ("POST", "/api-token-auth/", lambda b: b["detail"]),
            ("POST", "/api/v1/auth/", lambda b: b["error"]),
            ("PUT", "/api/v1/user", lambda b: (b["success"], b["msg"])[1]),
            ("POST", "/dropbundles", lambda b: b["error"]),
            ("POST", "/v1/accounts", lambda b: b["error_description"]),
        ]
        for method, path, message in cases:
            status, _, body = await web.call(
                method, path, data=big, headers={"Content-Type": "application/json"}
            )
            self.assertEqual(status, 413, path)
            self.assertEqual(message(body), f"Request body too large (at most {MAX} bytes).")
        _, _, body = await web.call("PUT", "/api/v1/user", data=big)
        self.assertIs(body["success"], False)

    async def test_json_has_its_own_smaller_limit(self) -> None:
        web = Web.build(
            Config(http_max_body=10 * MAX, sections={"web": {"json_max_body": MAX}})
        )
        body = json.dumps({"username": "a" * MAX, "password": "b"})
        status, _, reply = await web.call(
            "POST", "/api-token-auth/", data=body, headers={"Content-Type": "application/json"}
        )
        self.assertEqual((status, reply), (413, {"detail": f"Request body too large (at most "
                                                           f"{MAX} bytes)."}))


class _CountingBuffer(io.BytesIO):
    """A request body buffer that remembers the most it ever held."""

    def __init__(self) -> None:
        super().__init__()
        self.most = 0

    def write(self, data: Any) -> int:
        written = super().write(data)
        self.most = max(self.most, self.tell())
        return written


class _Recording(LimitedRequest):
    """Keeps the body buffer of every request, to show how much of a body was stored."""

    buffers: list[_CountingBuffer] = []

    def gotLength(self, length: int | None) -> None:
        super().gotLength(length)
        if not self.body_too_large:
            self.content = _CountingBuffer()
            _Recording.buffers.append(self.content)



class HalfClosingTransport(StringTransport):
    """A StringTransport that can close its write side only, as TCP can."""

    write_closed = False
    resumed = 0
    closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def resumeProducing(self) -> None:
        self.resumed += 1

    def abortConnection(self) -> None:
        self.aborted = True


class _FillingTransport(HalfClosingTransport):
    """A transport whose send buffer each write fills (while `full`): it pauses its
    producer, the channel, as a TCP transport does when the client reads nothing."""

    full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.full and self.producer is not None:
            self.producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))


@implementer(IPushProducer)
class _WaitingProducer:
    """The producer of a streamed reply: it waits for the transport to want more."""

    stopped = False

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


class _StreamedForever(Resource):
    """A reply streamed by a producer, as the file downloads are."""

    isLeaf = True
    producer = _WaitingProducer()

    def render_GET(self, request: Any) -> Any:
        _StreamedForever.producer = _WaitingProducer()
        request.registerProducer(_StreamedForever.producer, True)
        request.write(b"the first bytes")
        return NOT_DONE_YET


PING = b"GET /api/v1/ping HTTP/1.1\r\nHost: x\r\n\r\n"


class _TCPTransport(StringTransport):
    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


class StreamingTests(TestCase):
    def setUp(self) -> None:
        core, _ = make_core(Config(http_max_body=MAX))
        self.clock = Clock()
        settings = WebSettings(max_body=MAX)
        self.site = MailcoreSite(build_root(core, settings), settings, self.clock)
        self.site.requestFactory = _Recording
        _Recording.buffers = []
        self.transport = HalfClosingTransport()
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)

    def tearDown(self) -> None:
        self.channel.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def sent(self) -> bytes:
        return bytes(self.transport.value())

    def reply(self) -> tuple[bytes, dict[str, Any]]:
        head, _, body = self.sent().partition(b"\r\n\r\n")
        return head, json.loads(body)

    def test_whether_a_connection_is_tls_is_its_transports_answer(self) -> None:
        self.assertIs(self.channel.isSecure(), False)
        tls = _TCPTransport()
        directlyProvides(tls, ISSLTransport)
        channel = self.site.buildProtocol(None)
        channel.makeConnection(tls)
        self.addCleanup(channel.connectionLost, None)
        for _ in range(2):  # asked of the transport once, answered the same after
            self.assertIs(channel.isSecure(), True)
            self.assertIs(self.channel.isSecure(), False)

    def test_our_address_is_asked_of_the_transport_once(self) -> None:
        asked = []
        get_host = self.transport.getHost
        self.transport.getHost = lambda: asked.append(1) or get_host()  # type: ignore
        for _ in range(2):
            self.channel.dataReceived(b"GET /api/v1/ping HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(self.sent().count(b"HTTP/1.1 401 "), 2)
        self.assertEqual(len(asked), 1)
        self.assertEqual(self.channel.getHost(), get_host())

    def test_an_overlong_request_line_is_a_414_and_a_header_line_a_431(self) -> None:
        """Twisted's line reader closed the connection without a word on a line over 16 KiB
        (a search of many terms in the query): the client is told which part was too
        long. A keep-alive request after an ordinary one is judged afresh."""
        self.channel.dataReceived(b"GET /api/v1/ping HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIn(b"HTTP/1.1 401 ", self.sent())
        self.transport.clear()
        self.channel.dataReceived(b"GET /api/v1/emails/?q=" + b"a+" * 5_000)
        self.channel.dataReceived(b"a+" * 5_000)
        self.assertTrue(self.sent().startswith(b"HTTP/1.1 414 URI Too Long\r\n"), self.sent())
        self.assertIn(b"Connection: close", self.sent())
        self.assertTrue(self.transport.disconnecting)

        channel = self.site.buildProtocol(None)
        transport = HalfClosingTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        channel.dataReceived(b"GET /api/v1/ping HTTP/1.1\r\nHost: a\r\nX-Big: "
                             + b"b" * 17_000 + b"\r\n\r\n")
        reply = bytes(transport.value())
        self.assertTrue(reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
                        reply)
        head, _, body = reply.partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: " + str(len(body)).encode(), head)
        self.assertTrue(transport.disconnecting)

    def connection(self) -> tuple[Any, HalfClosingTransport]:
        channel = self.site.buildProtocol(None)
        transport = HalfClosingTransport()
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        return channel, transport

    def test_host_fields_as_rfc_9112_wants_them(self) -> None:
        """An HTTP/1.1 request without Host, or any with two Host fields (or one that is no
        host), is a 400 and the connection closes; Twisted served them. HTTP/1.0 needs
        none."""
        refused = [
            b"GET /api/v1/ping HTTP/1.1\r\n\r\n",
            b"GET /api/v1/ping HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET /api/v1/ping HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
            b"GET /api/v1/ping HTTP/1.1\r\nHost: a b\r\n\r\n",
            b"GET /api/v1/ping HTTP/1.1\r\nHost: u@a\r\n\r\n",
            b"POST /api/v1/auth/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nabcde"
            b"GET /api/v1/ping HTTP/1.1\r\nHost: a\r\n\r\n",
        ]
        for request in refused:
            channel, transport = self.connection()
            channel.dataReceived(request)
            reply = bytes(transport.value())
            self.assertTrue(reply.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (request, reply))
            self.assertNotIn(b"HTTP/1.1 401 ", reply, request)  # nothing served
            self.assertIn(b"Connection: close", reply)
            self.assertTrue(transport.disconnecting)
        for request in (b"GET /api/v1/ping HTTP/1.0\r\n\r\n",
                        b"GET /api/v1/ping HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
                        b"GET /api/v1/ping HTTP/1.1\r\nHost: mail.example.test:443\r\n\r\n"):
            channel, transport = self.connection()
            channel.dataReceived(request)
            self.assertIn(b" 401 ", bytes(transport.value()).split(b"\r\n")[0], request)

    def test_an_absolute_form_target_is_served_as_its_path_and_host(self) -> None:
        """`GET http://host/path` (RFC 9112 3.2.2: a server must accept it) is the request
        for /path on host, whatever Host says; it was a 404 for every path."""
        seen: list[tuple[bytes, bytes | None]] = []
        received = _Recording.requestReceived

        def record(request: Any, command: bytes, path: bytes, version: bytes) -> None:
            seen.append((path, request.getHeader(b"host")))
            received(request, command, path, version)

        self.patch(_Recording, "requestReceived", record)
        self.channel.dataReceived(
            b"GET HTTP://mail.example.test:8080/api/v1/ping?x=1 HTTP/1.1\r\n"
            b"Host: other.example\r\n\r\n")
        self.assertTrue(self.sent().startswith(b"HTTP/1.1 401 "), self.sent())
        self.assertEqual(seen, [(b"/api/v1/ping?x=1", b"mail.example.test:8080")])
        channel, transport = self.connection()
        channel.dataReceived(b"GET http://a.example HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.assertEqual(seen[-1], (b"/", b"a.example"))
        channel, transport = self.connection()
        channel.dataReceived(b"GET http://u@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n")
        self.assertTrue(bytes(transport.value()).startswith(b"HTTP/1.1 400 "))

    def test_a_declared_oversized_body_is_refused_before_it_is_sent(self) -> None:
        self.channel.dataReceived(
            b"POST /api/v1/auth/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 100000000\r\n\r\n"
        )
        head, body = self.reply()
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertNotIn(b"100 Continue", self.sent())
        self.assertIn(b"Connection: close", head)
        self.assertIn(b"Server: mailcore", head)
        self.assertIn(b"Content-Length: " + str(len(self.sent()) - len(head) - 4).encode(), head)
        self.assertEqual(body, {"error": f"Request body too large (at most {MAX} bytes)."})
        # Lingering close: the write side is shut, what the client still sends is dropped.
        self.assertTrue(self.transport.write_closed)
        self.assertFalse(self.transport.disconnecting)
        written = len(self.sent())
        for _ in range(50):
            self.channel.dataReceived(b"y" * 10_000)
        self.assertEqual(len(self.sent()), written)
        self.assertEqual(_Recording.buffers, [])  # the body never had a buffer
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(LINGER_SECONDS)
        self.assertTrue(self.transport.disconnecting)

    def test_the_lingering_close_ends_once_the_declared_body_has_arrived(self) -> None:
        self.channel.dataReceived(
            b"PUT /api/v1/user HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
        )
        head, body = self.reply()
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "))
        self.assertIs(body["success"], False)
        self.channel.dataReceived(b"z" * 4999)
        self.assertFalse(self.transport.disconnecting)
        self.channel.dataReceived(b"z")
        self.assertTrue(self.transport.disconnecting)

    def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(self) -> None:
        self.channel.dataReceived(
            b"POST /api-token-auth/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n"
        )
        self.channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n")
        self.assertEqual(self.sent(), b"")  # 600 bytes: still under the limit
        self.channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n" + b"258\r\n" + b"a" * 100)
        head, body = self.reply()
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertEqual(body, {"detail": f"Request body too large (at most {MAX} bytes)."})
        self.assertLessEqual(max(b.most for b in _Recording.buffers), MAX)
        written = len(self.sent())
        self.channel.dataReceived(b"a" * 500 + b"\r\n0\r\n\r\n")
        self.assertEqual(len(self.sent()), written)
        self.clock.advance(LINGER_SECONDS)
        self.assertTrue(self.transport.disconnecting)

    def test_bodies_within_the_limit_are_served_and_the_connection_kept(self) -> None:
        body = b"username=nobody&password=x"
        request = (
            b"POST /api/v1/auth/ HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        self.channel.dataReceived(request + request)
        self.clock.advance(0)  # the pipelined one is read in a turn of its own
        self.assertEqual(self.sent().count(b"HTTP/1.1 401 Unauthorized"), 2)
        self.assertFalse(self.transport.disconnecting)

    def test_pipelined_requests_are_read_one_reactor_turn_apart(self) -> None:
        # Twisted answered every pipelined request of a read in one turn of the reactor:
        # thousands of them from one client while every other connection waited.
        # (A Clock runs in one advance what a reactor runs in its next turns.)
        self.channel.dataReceived(PING * 3)
        self.assertEqual(self.sent().count(b"HTTP/1.1 401 "), 1)
        reads = [c.getTime() for c in self.clock.getDelayedCalls()
                 if getattr(c, "func", None) == self.channel._read_pipelined]
        self.assertEqual(reads, [self.clock.seconds()])  # the next read: a later turn
        self.clock.advance(0)
        self.assertEqual(self.sent().count(b"HTTP/1.1 401 "), 3)
        self.assertFalse(self.transport.disconnecting)

    def test_pipelined_requests_wait_while_the_client_reads_no_reply(self) -> None:
        transport = _FillingTransport()
        channel = self.site.buildProtocol(None)
        channel.makeConnection(transport)
        self.addCleanup(channel.connectionLost, None)
        transport.full = True  # each reply fills the send buffer: the client reads nothing
        channel.dataReceived(PING * 3)
        self.clock.advance(0)
        self.clock.advance(1)
        self.assertEqual(transport.value().count(b"HTTP/1.1 401 "), 1)
        for answered in (2, 3):
            channel.resumeProducing()  # the client read what was sent: the next is read
            self.clock.advance(0)
            self.clock.advance(1)
            self.assertEqual(transport.value().count(b"HTTP/1.1 401 "), answered)
        self.assertFalse(transport.disconnecting)


class NonUploadLimitTests(TestCase):
    """Only the upload paths take bodies up to `[web] max_body`: every other path refuses
    one over `json_max_body` while it arrives (it took 25 MiB before)."""

    def setUp(self) -> None:
        core, _ = make_core(Config(http_max_body=100 * MAX))
        self.clock = Clock()
        settings = WebSettings(max_body=100 * MAX, json_max_body=MAX)
        self.site = MailcoreSite(build_root(core, settings), settings, self.clock)
        self.site.requestFactory = _Recording
        _Recording.buffers = []
        self.connect()

    def connect(self) -> None:
        self.transport = HalfClosingTransport()
        self.channel = self.site.buildProtocol(None)
        self.channel.makeConnection(self.transport)
        self.addCleanup(self.channel.connectionLost, None)

    def head(self) -> bytes:
        return bytes(self.transport.value()).partition(b"\r\n\r\n")[0]

    def test_a_body_over_the_json_limit_is_refused_before_it_is_read(self) -> None:
        for path in (b"/api/v1/auth/", b"/api/imap-servers/", b"/dropbundles",
                     b"/nowhere/at/all"):
            self.connect()
            self.channel.dataReceived(
                b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                b"\r\nContent-Length: " + str(50 * MAX).encode() + b"\r\n\r\n")
            self.assertTrue(self.head().startswith(b"HTTP/1.1 413 "), (path, self.head()))
            self.assertEqual(_Recording.buffers, [], path)  # no byte of it kept

    def test_a_chunked_body_on_a_non_upload_path_is_cut_at_the_json_limit(self) -> None:
        self.channel.dataReceived(
            b"POST /api-token-auth/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: application/json\r\n\r\n")
        for _ in range(3):
            self.channel.dataReceived(b"258\r\n" + b"a" * 600 + b"\r\n")
        self.assertTrue(self.head().startswith(b"HTTP/1.1 413 "), self.head())
        self.assertLessEqual(max(b.most for b in _Recording.buffers), MAX)

    def test_an_upload_path_still_takes_the_larger_body(self) -> None:
        body = b"x" * (50 * MAX)
        self.channel.dataReceived(
            b"POST /dropbundles/1/dropfiles HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        # Not refused for its size: the API's 401 (no credential), given before any of the
        # body is read (the upload gate; tests.test_web_upload_gate has good credentials).
        self.assertTrue(self.head().startswith(b"HTTP/1.1 401 "), self.head())
        self.assertEqual(max((b.most for b in _Recording.buffers), default=0), 0)


class _Flood(Protocol):
    """Writes FLOOD bytes as soon as it connects."""

    FLOOD = 8 * 1024 * 1024
    made: list[Any] = []

    def connectionMade(self) -> None:
        _Flood.made.append(self.transport)
        assert self.transport is not None
        self.transport.write(b"x" * self.FLOOD)


class UnsentTests(TestCase):
    """`web.limits._unsent` reads what a TCP transport holds for its client from Twisted's
    private attributes (`dataBuffer`, `offset`, `_tempDataLen` of
    twisted.internet.abstract.FileDescriptor): no public interface tells how much of a
    reply the client read while the transport stays paused. Without them the send deadline
    could not tell a slow reader from a stopped one, and dropped both; this fails when a
    Twisted upgrade renames them."""

    async def test_what_a_tcp_transport_holds_is_read_from_it(self) -> None:
        reactor = get_reactor()
        _Flood.made = []
        port = reactor.listenTCP(0, Factory.forProtocol(_Flood), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port), timeout=5)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        self.addCleanup(client.close)
        for _ in range(50):
            await sleep(0.05)
            if _Flood.made:
                break
        [transport] = _Flood.made
        self.addCleanup(transport.abortConnection)
        await sleep(0.2)
        for name in ("dataBuffer", "offset", "_tempDataLen"):
            self.assertTrue(hasattr(transport, name), name)
        held = _unsent(transport)
        self.assertIsInstance(held, int)
        assert held is not None
        self.assertGreater(held, 0)
        self.assertLessEqual(held, _Flood.FLOOD)
        client.setblocking(False)
        read = 0
        for _ in range(100):  # read some, let the reactor send more
            try:
                while read < 2 * 1024 * 1024:
                    chunk = client.recv(65536)
                    if not chunk:
                        break
                    read += len(chunk)
            except BlockingIOError:
                pass
            await sleep(0.01)
            if read >= 2 * 1024 * 1024:
                break
        await sleep(0.1)
        after = _unsent(transport)
        assert after is not None
        self.assertLess(after, held)


class LoopbackTests(TestCase):
    """The whole site on a real socket, with a real client."""

    async def setUp(self) -> None:  # type: ignore[override]
        reactor = get_reactor()
        core, _ = make_core(Config(http_max_body=100_000))
        core.clock = reactor
        await core.identity.create_user("alice", "alice@example.test", PASSWORD)
        site = build_site(core)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        # Wait for every server-side connection to close (a refused upload lingers while
        # the client finishes sending) before the test ends.
        closed: list[Deferred[None]] = []
        self.channels: list[Any] = []
        build = site.buildProtocol

        def build_protocol(addr: Any) -> Any:
            protocol = build(addr)
            done: Deferred[None] = Deferred()
            closed.append(done)
            lost = protocol.connectionLost

            def connection_lost(reason: Any) -> None:
                lost(reason)
                done.callback(None)

            protocol.connectionLost = connection_lost
            self.channels.append(protocol)
            return protocol

        site.buildProtocol = build_protocol  # type: ignore[method-assign]
        self.addCleanup(lambda: gatherResults(closed))
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = HTTPClient(Agent(reactor, pool=pool))
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    async def test_treq_gets_the_413_for_a_large_upload(self) -> None:
        response = await self.client.put(
            self.base + "/api/v1/user", data=b"x" * 3_000_000,
            headers=Headers({b"Content-Type": [b"application/json"]}),
        )
        body = json.loads(await response.content())
        self.assertEqual(response.code, 413)
        self.assertEqual(body["msg"], "Request body too large (at most 100000 bytes).")

    async def test_a_client_that_sends_everything_before_reading_sees_the_413(self) -> None:
        port = self.port.getHost().port

        def blocking_upload() -> tuple[int, bytes]:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
            try:
                connection.request("POST", "/api/v1/auth/", body=b"x" * 3_000_000,
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()

        status, body = await threads.deferToThread(blocking_upload)
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body), {"error": "Request body too large (at most "
                                                       "100000 bytes)."})

    async def test_a_client_that_pipelines_without_reading_is_answered_as_it_reads(self) -> None:
        # 40 pipelined GET /openapi.json (345 kB each) from a client that reads nothing:
        # Twisted answered them all into the send buffer at once (14 MB kept, the reactor
        # busy meanwhile); 3000 such requests took the daemon from 110 MiB to 1.1 GiB.
        port = self.port.getHost().port
        count = 40

        def send_all() -> socket.socket:
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            client.settimeout(20)
            client.connect(("127.0.0.1", port))
            client.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * count)
            return client

        client = await threads.deferToThread(send_all)
        self.addCleanup(client.close)
        await deferLater(get_reactor(), 1.0, lambda: None)
        [channel] = self.channels
        transport = channel.transport
        kept = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        self.assertLess(kept, 1_000_000)

        def read_all() -> int:
            data = b""
            deadline = time.monotonic() + 60
            while data.count(b"HTTP/1.1 200 OK") < count and time.monotonic() < deadline:
                chunk = client.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
            client.close()
            return data.count(b"HTTP/1.1 200 OK")

        self.assertEqual(await threads.deferToThread(read_all), count)

    async def test_an_ordinary_login_over_the_socket(self) -> None:
        response = await self.client.post(
            self.base + "/api-token-auth/", json={"username": "alice", "password": PASSWORD}
        )
        self.assertEqual(response.code, 200)
        self.assertIn("token", json.loads(await response.content()))


def peer(host: str, port: int = 40000) -> IPv4Address:
    return IPv4Address("TCP", host, port)


class ConnectionLimitTests(TestCase):
    """The site's connection caps and deadlines, on a Clock and StringTransports."""

    def setUp(self) -> None:
        self.build()

    def build(self, **limits: Any) -> None:
        core, _ = make_core(Config())
        self.clock = Clock()
        settings = WebSettings(**{
            "max_connections": 10, "max_connections_per_ip": 2, "header_timeout": 30.0,
            "body_timeout": 60.0, "idle_timeout": 120.0, **limits,
        })
        self.site = MailcoreSite(build_root(core, settings), settings, self.clock)
        self.open: list[tuple[Any, HalfClosingTransport]] = []

    def tearDown(self) -> None:
        for protocol, transport in self.open:
            if not transport.closed:
                transport.closed = True
                protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((self.site.connections.total, self.site.connections.by_address),
                         (0, {}))

    def connect(self, host: str) -> tuple[Any, HalfClosingTransport]:
        address = peer(host, 40000 + len(self.open))
        protocol = self.site.buildProtocol(address)
        transport = HalfClosingTransport(peerAddress=address)
        protocol.makeConnection(transport)
        self.open.append((protocol, transport))
        return protocol, transport

    def close(self, protocol: Any, transport: HalfClosingTransport) -> None:
        transport.closed = True
        protocol.connectionLost(Failure(ConnectionDone()))

    def assertServed(self, protocol: Any, transport: HalfClosingTransport) -> None:
        protocol.dataReceived(b"GET /api/v1/ping HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "), transport.value())
        transport.clear()

    def assertRefused(self, transport: HalfClosingTransport, why: bytes) -> None:
        head, _, body = bytes(transport.value()).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"), head)
        self.assertIn(b"\r\nRetry-After: 10\r\n", head)
        self.assertIn(b"\r\nConnection: close", head)
        self.assertEqual(body, why + b"; try again later.\n")
        self.assertTrue(transport.write_closed)
        self.clock.advance(REFUSED_LINGER_SECONDS)
        self.assertTrue(transport.disconnecting)

    def test_a_client_over_its_address_cap_is_refused_while_another_is_served(self) -> None:
        first = self.connect("203.0.113.5")
        self.connect("203.0.113.5")
        refused, transport = self.connect("203.0.113.5")
        self.assertNotIsInstance(refused, LimitedChannel)
        refused.dataReceived(b"GET /api/v1/ping HTTP/1.1\r\nHost: x\r\n\r\n")  # dropped
        self.assertRefused(transport, b"Too many connections from your address")
        self.assertServed(*self.connect("198.51.100.7"))
        self.assertServed(*first)
        # The cap counts open connections: when one closes, the address may connect again.
        self.close(*first)
        again, again_transport = self.connect("203.0.113.5")
        self.assertIsInstance(again, LimitedChannel)
        self.assertServed(again, again_transport)

    def test_over_tls_the_refusal_is_not_half_closed_under_the_handshake(self) -> None:
        self.connect("203.0.113.5")
        self.connect("203.0.113.5")
        refused = self.site.buildProtocol(peer("203.0.113.5"))
        transport = HalfClosingTransport(peerAddress=peer("203.0.113.5"))
        directlyProvides(transport, INegotiated)  # what the TLS wrapper provides
        refused.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "))
        self.assertFalse(transport.write_closed)
        self.assertTrue(transport.disconnecting)  # TLS sends it after the handshake

    def test_an_ipv4_mapped_address_counts_as_its_ipv4_address(self) -> None:
        self.connect("203.0.113.5")
        self.connect("::ffff:203.0.113.5")
        _, transport = self.connect("203.0.113.5")
        self.assertRefused(transport, b"Too many connections from your address")

    def test_ipv6_clients_are_counted_by_their_64(self) -> None:
        """Every address of a /64 was a client of its own: one /64 took every connection
        (found by an audit)."""
        self.connect("2001:db8:1:2::1")
        self.connect("2001:db8:1:2::2")
        _, transport = self.connect("2001:db8:1:2:ffff::3")
        self.assertRefused(transport, b"Too many connections from your address")
        self.assertServed(*self.connect("2001:db8:1:3::1"))

    def test_the_total_cap(self) -> None:
        self.site.connections.max_total = 3
        for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
            self.connect(host)
        _, transport = self.connect("192.0.2.4")
        self.assertRefused(transport, b"Too many connections")

    def test_a_slowloris_header_trickle_is_cut_at_the_deadline(self) -> None:
        channel, transport = self.connect("203.0.113.5")
        self.clock.advance(100)  # silence before the first byte is the idle timeout's
        channel.dataReceived(b"GET /api/v1/ping HTTP/1.1\r\n")
        for _ in range(29):  # one byte a second keeps the idle timeout from firing
            self.clock.advance(1)
            channel.dataReceived(b"X")
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)  # 30 s after the request's first byte
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        )
        self.assertTrue(transport.disconnecting)
        channel.dataReceived(b"-Header: 1\r\n\r\n")  # too late: nothing is served
        self.assertNotIn(b"401", transport.value())
        self.clock.advance(channel.abortTimeout)  # a client that never lets go is aborted
        self.assertTrue(transport.aborted)

    def test_a_trickling_body_is_cut_at_the_deadline(self) -> None:
        channel, transport = self.connect("203.0.113.5")
        channel.dataReceived(
            b"POST /api/v1/auth/ HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n\r\n"
        )
        for _ in range(59):
            self.clock.advance(1)
            channel.dataReceived(b"a")
        self.assertEqual(transport.value(), b"")
        self.clock.advance(1)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 "))
        self.assertTrue(transport.disconnecting)

    def test_each_keepalive_request_gets_its_own_deadlines(self) -> None:
        channel, transport = self.connect("203.0.113.5")
        for _ in range(3):
            channel.dataReceived(b"GET /api/v1/ping HTTP/1.1\r\n")
            self.clock.advance(29)
            channel.dataReceived(b"Host: x\r\n\r\n")
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 "))
            transport.clear()
            self.clock.advance(100)  # idle between requests: not the header deadline's
        self.assertFalse(transport.disconnecting)
        # A pipelined request whose rest never comes is cut at its own deadline.
        channel.dataReceived(b"GET /api/v1/ping HTTP/1.1\r\nHost: x\r\n\r\nGET /api/v1/p")
        self.assertEqual(transport.value().count(b"HTTP/1.1 401 "), 1)
        self.clock.advance(30)
        self.assertIn(b"HTTP/1.1 408 ", transport.value())

    def test_a_client_that_reads_nothing_of_a_streamed_reply_is_dropped(self) -> None:
        # A streamed reply (a file, a long JSON array) waits on the transport while the
        # client reads nothing; nothing else times it out: the connection, its slot and
        # the reply's file were held for ever.
        self.site.resource = _StreamedForever()
        channel, transport = self.connect("203.0.113.5")
        channel.dataReceived(b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        channel.pauseProducing()  # the transport's send buffer is full
        self.clock.advance(100)
        channel.resumeProducing()  # the client read some: the deadline starts again
        channel.pauseProducing()
        self.clock.advance(119)
        self.assertFalse(transport.aborted)
        self.clock.advance(1)  # idle_timeout without reading a byte
        self.assertTrue(transport.aborted)
        channel.stopProducing()  # what a TCP transport does when the connection is gone
        self.close(channel, transport)
        self.assertTrue(_StreamedForever.producer.stopped)
        self.assertEqual(self.site.connections.total, 0)

    def test_a_client_that_reads_a_streamed_reply_slowly_is_kept(self) -> None:
        self.site.resource = _StreamedForever()
        channel, transport = self.connect("203.0.113.5")
        channel.dataReceived(b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n")
        held: Any = transport
        held.dataBuffer, held.offset = b"x" * 100_000, 0  # what a TCP transport holds
        channel.pauseProducing()
        self.clock.advance(60)
        held.offset = 1  # the client read a byte in two minutes: it is reading
        self.clock.advance(60)
        self.assertFalse(transport.aborted)
        self.clock.advance(120)  # and then nothing for two minutes
        self.assertTrue(transport.aborted)
        channel.stopProducing()
        self.close(channel, transport)

    def test_an_idle_keepalive_connection_is_closed_quietly(self) -> None:
        events: list[dict[str, Any]] = []
        observe: Any = events.append
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        channel, transport = self.connect("203.0.113.5")
        self.assertServed(channel, transport)
        self.clock.advance(119)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")  # nothing is said to an idle client
        timeouts = [e for e in events if "Timing out" in (e.get("log_format") or "")]
        self.assertEqual([e["log_level"] for e in timeouts], [LogLevel.debug])
