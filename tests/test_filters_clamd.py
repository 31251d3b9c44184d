"""The clamd client: INSTREAM framing and replies byte for byte (StringTransport), hostile
replies, timeouts by the Clock, and a real clamd with a self-made EICAR database."""

from __future__ import annotations

import struct
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from filters._net import client_endpoint, parse_address
from filters.builtin import EICAR
from filters.clamd import ClamdClient
from filters.interface import FilterError, FilterTimeout, MessageTooLarge, Verdict
from tests.support import filterd
from tests.support.filterd import (
    FakeEndpoint,
    attachment,
    message,
    multipart,
    text_part,
    zip_bytes,
)
from tests.support.reactor import get_reactor


def frames(data: bytes) -> list[bytes]:
    """Split INSTREAM chunk frames (after the command); the last one must be empty."""
    chunks = []
    while data:
        (length,) = struct.unpack(">I", data[:4])
        chunks.append(data[4:4 + length])
        data = data[4 + length:]
    return chunks


def pump(transport: StringTransport) -> None:
    """Let the registered pull producer write everything, as a draining socket would."""
    for _ in range(10_000):
        if transport.producer is None:
            return
        transport.producer.resumeProducing()
    raise AssertionError("producer never finished")


class ClamdProtocolTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.endpoint = FakeEndpoint()

    def client(self, **kw: Any) -> ClamdClient:
        return ClamdClient(cast(IStreamClientEndpoint, self.endpoint), self.clock, **kw)

    def start(self, client: ClamdClient, msg: bytes = b"hello") -> defer.Deferred[Verdict]:
        return defer.Deferred.fromCoroutine(client.scan(msg))

    def reply(self, data: bytes, close: bool = True) -> None:
        proto = self.endpoint.protocols[-1]
        proto.dataReceived(data)
        if close:
            proto.connectionLost(Failure(ConnectionDone()))

    def test_instream_framing(self) -> None:
        msg = bytes(range(256)) * 10  # 2560 bytes
        d = self.start(self.client(chunk_size=1000), msg)
        transport = self.endpoint.transports[0]
        self.assertEqual(transport.value(), b"zINSTREAM\0")
        self.assertFalse(transport.streaming)
        pump(transport)
        written = transport.value()[len(b"zINSTREAM\0"):]
        self.assertEqual([len(c) for c in frames(written)], [1000, 1000, 560, 0])
        self.assertEqual(b"".join(frames(written)), msg)
        self.reply(b"stream: OK\0")
        verdict = self.successResultOf(d)
        self.assertTrue(verdict.clean)
        self.assertEqual(verdict.filter, "clamd")

    def test_empty_message_is_just_the_terminator(self) -> None:
        d = self.start(self.client(), b"")
        transport = self.endpoint.transports[0]
        pump(transport)
        self.assertEqual(transport.value(), b"zINSTREAM\0\0\0\0\0")
        self.reply(b"stream: OK\0")
        self.successResultOf(d)

    def test_found(self) -> None:
        d = self.start(self.client())
        pump(self.endpoint.transports[0])
        self.reply(b"stream: Eicar-Test-Signature-Body.UNOFFICIAL FOUND\0", close=False)
        verdict = self.successResultOf(d)
        self.assertEqual(verdict.viruses, ("Eicar-Test-Signature-Body.UNOFFICIAL",))
        self.assertEqual(verdict.reasons,
                         ("clamd found Eicar-Test-Signature-Body.UNOFFICIAL",))
        self.assertTrue(self.endpoint.transports[0].disconnecting)

    def test_several_matches(self) -> None:
        d = self.start(self.client())
        self.reply(b"stream: A.B FOUND\nstream: C.D FOUND\nstream: A.B FOUND\0")
        self.assertEqual(self.successResultOf(d).viruses, ("A.B", "C.D"))

    def test_size_limit_reply_stops_the_upload(self) -> None:
        d = self.start(self.client(chunk_size=10, max_size=0), b"x" * 1000)
        transport = self.endpoint.transports[0]
        assert transport.producer is not None
        transport.producer.resumeProducing()  # one chunk out, then clamd gives up
        self.reply(b"INSTREAM size limit exceeded. ERROR\0")
        failure = self.failureResultOf(d, MessageTooLarge)
        self.assertIn("StreamMaxLength", str(failure.value))
        self.assertTrue(failure.value.permanent)
        self.assertIsNone(transport.producer)  # no more chunks written

    def test_an_ok_before_the_whole_stream_is_not_a_clean_verdict(self) -> None:
        # clamd scans once it has the terminating chunk: an OK sooner is a lie (a broken
        # or hostile daemon), and the rest of the message, the virus maybe, went unread.
        d = self.start(self.client(chunk_size=10, max_size=0), b"x" * 1000 + EICAR)
        transport = self.endpoint.transports[0]
        assert transport.producer is not None
        transport.producer.resumeProducing()  # one chunk out
        self.reply(b"stream: OK\0", close=False)
        failure = self.failureResultOf(d, FilterError)
        self.assertIn("answered 'stream: OK' before the whole message was sent",
                      str(failure.value))
        self.assertNotIsInstance(failure.value, MessageTooLarge)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)

    def test_an_ok_line_and_a_close_before_the_whole_stream_is_not_clean(self) -> None:
        d = self.start(self.client(chunk_size=10, max_size=0), b"x" * 1000)
        self.reply(b"stream: OK\n")  # no NUL, then the close
        self.assertIn("before the whole message was sent",
                      str(self.failureResultOf(d, FilterError).value))

    def test_the_last_byte_written_then_ok_is_clean(self) -> None:
        d = self.start(self.client(chunk_size=10, max_size=0), b"x" * 25)
        transport = self.endpoint.transports[0]
        pump(transport)
        self.assertTrue(transport.value().endswith(b"\0\0\0\0"))
        self.reply(b"stream: OK\0")
        self.assertTrue(self.successResultOf(d).clean)

    def test_a_found_before_the_whole_stream_is_still_a_virus(self) -> None:
        d = self.start(self.client(chunk_size=10, max_size=0), b"x" * 1000)
        self.reply(b"stream: Bad.Thing FOUND\0", close=False)
        self.assertEqual(self.successResultOf(d).viruses, ("Bad.Thing",))

    def test_other_errors(self) -> None:
        d = self.start(self.client())
        self.reply(b"stream: Can't allocate memory ERROR\0")
        self.assertIn("clamd error: stream: Can't allocate memory ERROR",
                      str(self.failureResultOf(d, FilterError).value))

    def test_garbage_reply(self) -> None:
        d = self.start(self.client())
        self.reply(b"UNKNOWN COMMAND\0")
        self.assertIn("unexpected clamd reply",
                      str(self.failureResultOf(d, FilterError).value))

    def test_garbage_signature_name(self) -> None:
        d = self.start(self.client())
        self.reply(b"stream: " + b"N" * 500 + b" FOUND\0")
        self.assertIn("bad signature name", str(self.failureResultOf(d, FilterError).value))

    def test_huge_reply_is_cut_off(self) -> None:
        d = self.start(self.client(max_reply=100))
        self.endpoint.protocols[0].dataReceived(b"stream: " + b"x" * 200)
        self.assertIn("reply larger than 100 bytes",
                      str(self.failureResultOf(d, FilterError).value))
        self.assertTrue(self.endpoint.transports[0].disconnecting)

    def test_connection_dropped_mid_reply(self) -> None:
        d = self.start(self.client())
        self.endpoint.protocols[0].dataReceived(b"stream: Eicar")
        self.endpoint.protocols[0].connectionLost(Failure(ConnectionLost()))
        self.assertIn("reply cut short", str(self.failureResultOf(d, FilterError).value))

    def test_connection_dropped_without_reply(self) -> None:
        d = self.start(self.client())
        self.reply(b"")
        self.assertIn("connection closed before replying",
                      str(self.failureResultOf(d, FilterError).value))

    def test_silent_server_times_out_and_stops_the_upload(self) -> None:
        d = self.start(self.client(timeout=60, chunk_size=10), b"x" * 100)
        transport = self.endpoint.transports[0]
        self.clock.advance(60)
        self.failureResultOf(d, FilterTimeout)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(transport.producer)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connect_that_hangs_times_out(self) -> None:
        self.endpoint.hang = True
        d = self.start(self.client(timeout=3))
        self.clock.advance(3)
        self.failureResultOf(d, FilterTimeout)

    def test_max_size_refuses_without_connecting(self) -> None:
        d = self.start(self.client(max_size=4), b"12345")
        self.failureResultOf(d, MessageTooLarge)
        self.assertEqual(self.endpoint.transports, [])

    def test_ping_and_version(self) -> None:
        client = self.client()
        d = defer.Deferred.fromCoroutine(client.ping())
        self.assertEqual(self.endpoint.transports[0].value(), b"zPING\0")
        self.reply(b"PONG\0")
        self.assertEqual(self.successResultOf(d), "PONG")
        d2 = defer.Deferred.fromCoroutine(client.version())
        self.assertEqual(self.endpoint.transports[1].value(), b"zVERSION\0")
        self.reply(b"ClamAV 1.4.6/27000/Mon Nov 24 2025\0")
        self.assertEqual(self.successResultOf(d2), "ClamAV 1.4.6/27000/Mon Nov 24 2025")

    def test_bad_ping_reply(self) -> None:
        d = defer.Deferred.fromCoroutine(self.client().ping())
        self.reply(b"PANG\0")
        self.failureResultOf(d, FilterError)

    def test_chunk_size_must_be_positive(self) -> None:
        self.assertRaises(ValueError, self.client, chunk_size=0)


class _EarlyOk(Protocol):
    """A hostile clamd: answers OK as soon as the first bytes of the stream arrive."""

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        if not transport.disconnecting:
            transport.write(b"stream: OK\0")
            transport.loseConnection()


class HostileClamdTests(TestCase):
    """A lying clamd on 127.0.0.1, over a real socket."""

    timeout = 30

    async def test_an_early_ok_does_not_let_a_virus_through(self) -> None:
        reactor = get_reactor()
        port = reactor.listenTCP(0, Factory.forProtocol(_EarlyOk), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        parsed = parse_address(f"127.0.0.1:{port.getHost().port}")
        client = ClamdClient(client_endpoint(reactor, parsed, 10), reactor, address=parsed,
                             timeout=20, max_size=0)
        with self.assertRaises(FilterError) as caught:
            await client.scan(message(b"x" * 4_000_000 + EICAR))
        self.assertIn("before the whole message was sent", str(caught.exception))


class ClamdIntegrationTests(TestCase):
    """A real clamd whose database knows only EICAR (StreamMaxLength 2 MiB)."""

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        self.reactor = get_reactor()
        self.daemon = await filterd.clamd()

    def client(self, address: str | None = None, **kw: Any) -> ClamdClient:
        parsed = parse_address(address or self.daemon.address)
        return ClamdClient(client_endpoint(self.reactor, parsed, 10), self.reactor,
                           address=parsed, timeout=20, **kw)

    async def test_plain_eicar_is_found(self) -> None:
        verdict = await self.client().scan(message(EICAR))
        self.assertEqual(len(verdict.viruses), 1)
        self.assertTrue(verdict.viruses[0].endswith(".UNOFFICIAL"), verdict.viruses)
        self.assertTrue(verdict.viruses[0].startswith("Eicar-Test-Signature"))

    async def test_eicar_in_a_base64_attachment_is_found(self) -> None:
        data = multipart([text_part(), attachment("eicar.com", EICAR)])
        verdict = await self.client().scan(data)
        self.assertEqual(len(verdict.viruses), 1)
        self.assertTrue(verdict.viruses[0].endswith(".UNOFFICIAL"))

    async def test_eicar_in_a_zip_attachment_is_found(self) -> None:
        data = multipart([attachment("files.zip", zip_bytes({"e.com": EICAR}))])
        verdict = await self.client().scan(data)
        self.assertTrue(verdict.virus)

    async def test_clean_message_is_ok(self) -> None:
        verdict = await self.client().scan(message())
        self.assertTrue(verdict.clean)
        self.assertEqual(verdict.viruses, ())

    async def test_oversized_stream_is_a_clear_error(self) -> None:
        big = message(b"x" * (filterd.CLAMD_STREAM_MAX + 100_000))
        with self.assertRaises(MessageTooLarge) as caught:
            await self.client(max_size=0).scan(big)
        self.assertIn("INSTREAM size limit exceeded", str(caught.exception))
        self.assertTrue(caught.exception.permanent)

    async def test_unix_socket(self) -> None:
        verdict = await self.client(self.daemon.socket).scan(message(EICAR))
        self.assertTrue(verdict.virus)

    async def test_ping_and_version(self) -> None:
        client = self.client()
        self.assertEqual(await client.ping(), "PONG")
        self.assertTrue((await client.version()).startswith("ClamAV "))
