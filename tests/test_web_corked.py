"""`CorkedChannel`: a response's bytes reach the transport together, when the response ends.

Driven through a real `Site` and channel on a transport that records each write; once over
a loopback socket, where the bytes are sent at once (no reactor turn in between).
"""

from __future__ import annotations

import re
import socket
from typing import Any

from twisted.internet import threads
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase
from twisted.web import http, resource, server

from mailcore.pacing import Pacer
from tests.support.reactor import get_reactor
from web.corked import CORK_LIMIT, CorkedChannel

GET = b"GET /%s HTTP/1.1\r\nHost: example.test\r\n\r\n"


class _Writes(StringTransport):
    """A transport that keeps each write as one item."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))


class _Pages(resource.Resource):
    """/small: a short body; /big: one write of 3 x CORK_LIMIT; /streamed: a body that is
    streamed with a producer and ended later (`self.later`); /parts: three writes."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.later: list[server.Request] = []

    def render_GET(self, request: server.Request) -> Any:
        name = request.path.strip(b"/")
        if name == b"small":
            return b"hello"
        if name == b"big":
            return b"b" * (3 * CORK_LIMIT)
        if name == b"parts":
            for part in (b"one ", b"two ", b"three"):
                request.write(part)
            request.finish()
            return server.NOT_DONE_YET
        if name == b"streamed":
            request.registerProducer(Pacer(), True)  # as our streamed replies do
            request.write(b"first part ")
            self.later.append(request)
            return server.NOT_DONE_YET
        raise AssertionError(name)


class _Site(server.Site):
    """A plain site whose connections are corked channels."""

    protocol = CorkedChannel  # type: ignore[assignment]


class CorkTests(TestCase):
    def setUp(self) -> None:
        self.pages = _Pages()
        self.channel = _Site(self.pages).buildProtocol(None)
        self.transport = _Writes()
        self.channel.makeConnection(self.transport)

    def tearDown(self) -> None:
        self.channel.connectionLost(None)

    def test_a_response_goes_out_in_one_write(self) -> None:
        self.channel.dataReceived(GET % b"small")
        self.assertEqual(len(self.transport.writes), 1)
        reply = self.transport.writes[0]
        self.assertTrue(reply.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertIn(b"\r\nContent-Length: 5\r\n", reply)
        self.assertTrue(reply.endswith(b"\r\n\r\nhello"))

    def test_the_bytes_are_those_twisteds_channel_sends(self) -> None:
        # CorkedChannel writes the status line and headers itself (Twisted's channel hands
        # them to the transport directly): pinned against Twisted's own, so that an upgrade
        # which changes them shows here.
        class Plain(server.Site):
            protocol = http.HTTPChannel  # type: ignore[assignment]

        plain = Plain(_Pages()).buildProtocol(None)
        theirs = _Writes()
        plain.makeConnection(theirs)
        self.addCleanup(plain.connectionLost, None)
        for name in (b"small", b"parts"):
            plain.dataReceived(GET % name)
            self.channel.dataReceived(GET % name)

        def undated(data: bytes) -> bytes:
            return re.sub(rb"\r\nDate: [^\r]*", b"", data)

        self.assertEqual(undated(self.transport.value()), undated(theirs.value()))

    def test_a_response_written_in_parts_goes_out_in_one_write(self) -> None:
        self.channel.dataReceived(GET % b"parts")
        self.assertEqual(len(self.transport.writes), 1)
        # Chunked (no Content-Length), ended by the last chunk, all in that one write.
        self.assertTrue(self.transport.writes[0].endswith(
            b"\r\n\r\n4\r\none \r\n4\r\ntwo \r\n5\r\nthree\r\n0\r\n\r\n"))

    def test_pipelined_requests_are_answered_in_order_one_write_each(self) -> None:
        self.channel.dataReceived(GET % b"small" + GET % b"parts" + GET % b"small")
        self.assertEqual(len(self.transport.writes), 3)
        self.assertTrue(self.transport.writes[0].endswith(b"hello"))
        self.assertTrue(self.transport.writes[1].endswith(b"three\r\n0\r\n\r\n"))
        self.assertTrue(self.transport.writes[2].endswith(b"hello"))

    def test_a_large_body_is_not_held_past_the_limit(self) -> None:
        self.channel.dataReceived(GET % b"big")
        # Headers and body together once over the limit; nothing is left corked.
        self.assertEqual(len(self.transport.writes), 1)
        self.assertEqual(self.transport.writes[0].count(b"b" * 1024), 3 * CORK_LIMIT // 1024)
        self.assertIsNone(self.channel._cork)

    def test_a_streamed_response_goes_through_as_it_is_written(self) -> None:
        self.channel.dataReceived(GET % b"streamed")
        # The producer's registration sent nothing (nothing was written yet); the head and
        # the first part went out with the first write, before the response ended.
        sent = b"".join(self.transport.writes)
        self.assertTrue(sent.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertTrue(sent.endswith(b"\r\nb\r\nfirst part \r\n"))
        request = self.pages.later.pop()
        request.write(b"more")
        self.assertTrue(self.transport.writes[-1].endswith(b"more\r\n"))
        request.unregisterProducer()
        request.finish()
        self.assertTrue(b"".join(self.transport.writes).endswith(b"0\r\n\r\n"))

    def test_a_connection_not_kept_alive_closes_after_its_whole_reply(self) -> None:
        self.channel.dataReceived(
            b"GET /small HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.transport.value().endswith(b"\r\n\r\nhello"))

    def test_closing_sends_what_is_corked_first(self) -> None:
        self.channel.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.transport.writes, [])
        self.channel.loseConnection()
        self.assertEqual(self.transport.writes, [b"HTTP/1.1 204 No Content\r\n\r\n"])
        self.assertTrue(self.transport.disconnecting)

    def test_a_lost_connection_drops_what_is_corked(self) -> None:
        self.channel.write(b"partial")
        self.channel.connectionLost(None)
        self.channel.flush()
        self.assertEqual(self.transport.writes, [])


class LoopbackTests(TestCase):
    """Over a real socket (`write_now`'s path): whole replies, small and over the limit,
    one after another on one keep-alive connection."""

    async def test_replies_over_a_real_socket(self) -> None:
        reactor = get_reactor()
        port = reactor.listenTCP(0, _Site(_Pages()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        number = port.getHost().port

        def client() -> list[bytes]:
            with socket.create_connection(("127.0.0.1", number), timeout=10) as s:
                replies = []
                for name in (b"small", b"big", b"small"):
                    s.sendall(GET % name)
                    data = b""
                    want = b"hello" if name == b"small" else b"b" * (3 * CORK_LIMIT)
                    while not data.endswith(want):
                        piece = s.recv(65536)
                        if not piece:
                            break
                        data += piece
                    replies.append(data)
                return replies

        replies = await threads.deferToThread(client)
        self.assertEqual([r.split(b"\r\n", 1)[0] for r in replies], [b"HTTP/1.1 200 OK"] * 3)
        self.assertTrue(replies[1].endswith(b"\r\n\r\n" + b"b" * (3 * CORK_LIMIT)))
