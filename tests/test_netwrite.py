"""`write_now`: immediate sends on plain TCP transports, Twisted's buffering otherwise.

The transports here are real `twisted.internet.tcp.Server` objects over a socketpair, driven
by a MemoryReactor (no reactor runs; `doWrite` is called by hand where Twisted would).
"""

from __future__ import annotations

import socket

from twisted.internet import error, tcp
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailcore.netwrite import close_now, write_now


class _Recording(Protocol):
    def __init__(self) -> None:
        self.lost: list[Failure] = []

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.lost.append(reason)


def _server() -> tuple[tcp.Server, socket.socket, MemoryReactor]:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    peer.setblocking(False)
    reactor = MemoryReactor()
    transport = tcp.Server(ours, _Recording(), ("127.0.0.1", 1), None, 1, reactor)  # type: ignore[arg-type]
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


class CloseNowTests(unittest.TestCase):
    def setUp(self) -> None:
        self.transport, self.peer, self.reactor = _server()
        self.protocol = self.transport.protocol
        self.addCleanup(self.peer.close)
        self.addCleanup(self.close_socket)

    def close_socket(self) -> None:
        """The transport's socket, if close_now left it open."""
        if hasattr(self.transport, "socket"):
            self.transport.socket.close()

    def test_idle_connection_closes_at_once(self) -> None:
        """Nothing held unsent: closed now, as loseConnection would on its next turn (the
        protocol told ConnectionDone, the socket shut and out of the reactor), with no
        writability turn for it."""
        self.transport.startReading()
        write_now(self.transport, b"221 2.0.0 Bye\r\n")
        self.assertTrue(close_now(self.transport))
        self.assertEqual(len(self.protocol.lost), 1)  # type: ignore[attr-defined]
        self.assertTrue(self.protocol.lost[0].check(error.ConnectionDone))  # type: ignore[attr-defined]
        self.assertNotIn(self.transport, self.reactor.getReaders())
        self.assertNotIn(self.transport, self.reactor.getWriters())
        self.assertEqual(_read_all(self.peer), b"221 2.0.0 Bye\r\n")  # then the end
        self.assertEqual(self.peer.recv(10), b"")

    def test_bytes_held_unsent_are_sent_first(self) -> None:
        self.transport.write(b"queued\r\n")
        self.assertFalse(close_now(self.transport))
        self.assertEqual(self.protocol.lost, [])  # type: ignore[attr-defined]
        self.assertTrue(self.transport.disconnecting)
        self.assertIsInstance(self.transport.doWrite(), error.ConnectionDone)
        self.assertEqual(_read_all(self.peer), b"queued\r\n")

    def test_a_registered_producer_is_left_to_twisted(self) -> None:
        self.transport.registerProducer(Protocol(), True)  # type: ignore[arg-type]
        self.assertFalse(close_now(self.transport))
        self.assertEqual(self.protocol.lost, [])  # type: ignore[attr-defined]
        self.assertTrue(self.transport.disconnecting)

    def test_other_transports_lose_their_connection(self) -> None:
        transport = StringTransport()
        self.assertFalse(close_now(transport))
        self.assertTrue(transport.disconnecting)
