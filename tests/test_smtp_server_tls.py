"""STARTTLS with real TLS in memory (OpenSSL memory BIOs over iosim), against a test CA.

The injection test sends `STARTTLS\\r\\nRSET\\r\\n` in one write. A server that kept the
buffered RSET (stock Twisted's ESMTP, CVE-2011-0411 class) would answer it over TLS, so the
client's first reply after the handshake would be that 250 instead of the reply to its own
first command.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.store import Database
from mailcore.tls import server_context
from tests.support.smtpsession import RecordingSink, make_factory, served_domains
from tests.support.testca import shared_pki
from tests.support.tlsmemory import connect_tls_capable


class LineClient(Protocol):
    """Collects reply lines; the test writes raw bytes on its transport."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._buf = b""

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\r\n")
        self.lines += [line.decode("ascii") for line in lines]

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


class InMemoryStartTLSTests(TestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        self.clock = Clock()
        self.db = Database.for_tests()
        self.sink = RecordingSink()
        pki = shared_pki()
        cert, key = pki.write_server_pair(Path(self.mktemp()))
        self.client_options = pki.client_options("localhost")
        domains = await served_domains(self.db, self.clock)
        # the daemon's own loader for its TLS pair
        self.factory = make_factory(domains, self.sink, self.clock, tls=server_context(cert, key))
        self.server = self.factory.buildProtocol(None)
        self.client = LineClient()
        self.server_transport, self.client_transport, self.pump = connect_tls_capable(
            self.server, self.client
        )
        self.addCleanup(self.close)

    def close(self) -> None:
        self.client_transport.loseConnection()
        self.pump.flush()
        self.server.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def say(self, data: bytes) -> list[str]:
        self.client_transport.write(data)
        self.pump.flush()
        return self.client.take()

    def test_injected_command_never_runs_and_the_session_is_real_tls(self) -> None:
        self.assertEqual(self.client.take(), ["220 mx.gateway.test ESMTP Mailcore"])
        self.assertIn("250 STARTTLS", self.say(b"EHLO client.example\r\n"))
        self.assertEqual(self.say(b"STARTTLS\r\nRSET\r\n"), ["220 2.0.0 Ready to start TLS"])
        self.client_transport.startTLS(self.client_options)
        # the first reply over TLS answers our HELP: the injected RSET was never run
        self.assertEqual(self.say(b"HELP\r\n")[0][:4], "214 ")
        self.assertTrue(ISSLTransport.providedBy(self.server_transport))
        self.assertTrue(self.server.tls)
        self.assertEqual(self.say(b"MAIL FROM:<a@remote.test>\r\n"),
                         ["503 5.5.1 Error: send HELO/EHLO first"])
        lines = self.say(b"EHLO client.example\r\n")
        self.assertEqual(lines[-1], "250 ENHANCEDSTATUSCODES")
        replies = self.say(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@example.com>\r\nDATA\r\n")
        self.assertEqual([r[:3] for r in replies], ["250", "250", "354"])
        self.assertEqual(self.say(b"secret\r\n.\r\n")[0][:24], "250 2.0.0 Ok: queued as ")
        [accepted] = self.sink.messages
        self.assertTrue(accepted.envelope.tls)
        self.assertIn(b" with ESMTPS id ", accepted.data)
        self.assertTrue(accepted.data.endswith(b"\r\nsecret\r\n"))

    def test_a_client_checking_another_name_fails_the_handshake(self) -> None:
        self.client.take()
        self.say(b"EHLO client.example\r\nSTARTTLS\r\n")
        self.client_transport.startTLS(shared_pki().client_options("mx.elsewhere.test"))
        self.say(b"NOOP\r\n")
        self.assertTrue(self.client_transport.disconnecting)
        self.assertEqual(self.sink.messages, [])
        self.flushLoggedErrors()
