"""`write_now`: immediate sends on plain TCP transports, Twisted's buffering otherwise.

The transports here are real `twisted.internet.tcp.Server` objects over a socketpair, driven
by a MemoryReactor (no reactor runs; `doWrite` is called by hand where Twisted would).
"""

from __future__ import annotations

import socket

from twisted.internet import tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial import unittest

from mailcore.netwrite import write_now


def _server() -> tuple[tcp.Server, socket.socket, MemoryReactor]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    reactor = MemoryReactor()
    transport = tcp.Server(ours, Protocol(), ("127.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
    return transport, peer, reactor


def _read_all(peer: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = peer.recv(65536)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


class WriteNowTests(unittest.TestCase):
    def setUp(self) -> None:
        self.transport, self.peer, self.reactor = _server()
        self.addCleanup(self.peer.close)
        self.addCleanup(self.transport.socket.close)

    def test_twisted_internals_it_relies_on(self) -> None:
        """The private attributes read by write_now exist with the expected meaning."""
        t = self.transport
        self.assertEqual(t._tempDataBuffer, [])
        self.assertEqual((t.dataBuffer, t.offset), (b"", 0))
        self.assertFalse(t.TLS)
        self.assertFalse(t._writeDisconnected)
        t.write(b"x")
        self.assertEqual(t._tempDataBuffer, [b"x"])

    def test_idle_connection_sends_at_once(self) -> None:
        write_now(self.transport, b"250 2.0.0 Ok\r\n")
        self.assertEqual(_read_all(self.peer), b"250 2.0.0 Ok\r\n")
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_buffered_bytes_keep_their_place(self) -> None:
        """With bytes already waiting in Twisted's buffer, new bytes go behind them."""
        self.transport.write(b"first\r\n")
        write_now(self.transport, b"second\r\n")
        self.assertEqual(_read_all(self.peer), b"")
        self.transport.doWrite()
        self.assertEqual(_read_all(self.peer), b"first\r\nsecond\r\n")

    def test_partial_send_leaves_the_rest_to_twisted(self) -> None:
        data = bytes(range(256)) * 8192  # 2 MiB: more than a socket buffer takes
        write_now(self.transport, data)
        self.assertIn(self.transport, self.reactor.getWriters())
        received = _read_all(self.peer)
        while len(received) < len(data):
            self.transport.doWrite()
            received += _read_all(self.peer)
        self.assertEqual(received, data)

    def test_closing_connection_uses_twisted_write(self) -> None:
        self.transport.loseConnection()
        write_now(self.transport, b"late\r\n")
        self.assertEqual(_read_all(self.peer), b"")

    def test_other_transports_use_their_write(self) -> None:
        transport = StringTransport()
        write_now(transport, b"hello")
        self.assertEqual(transport.value(), b"hello")

    def test_peer_gone_is_left_to_twisted(self) -> None:
        """A send error is not raised here: Twisted's write path reports the lost connection."""
        self.peer.close()
        write_now(self.transport, b"a" * 10)
        write_now(self.transport, b"b" * 10)
        self.assertIsInstance(self.transport.doWrite(), BaseException)
