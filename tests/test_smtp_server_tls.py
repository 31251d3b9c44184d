"""STARTTLS with real TLS in memory (OpenSSL memory BIOs over iosim), against a test CA.

The injection test sends `STARTTLS\\r\\nRSET\\r\\n` in one write. A server that kept the
buffered RSET (stock Twisted's ESMTP, CVE-2011-0411 class) would answer it over TLS, so the
client's first reply after the handshake would be that 250 instead of the reply to its own
first command.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.tls import server_context
from tests.support.db import synchronous_database
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
        self.db = synchronous_database()
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


def _chained_pair(directory: Path) -> tuple[Path, Path, bytes]:
    """A root CA, an intermediate it signed and a `localhost` certificate the intermediate
    signed; writes fullchain.pem (server certificate, then the intermediate, as certbot
    does) and key.pem into `directory`. Returns (fullchain, key, root PEM)."""
    now = datetime.datetime.now(datetime.UTC)

    def issue(subject: str, issuer: str, key: Any, signer: Any, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    root_key, middle_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in "abc")
    root = issue("Chain Test Root", "Chain Test Root", root_key, root_key, True)
    middle = issue("Chain Test Intermediate", "Chain Test Root", middle_key, root_key, True)
    leaf = issue("localhost", "Chain Test Intermediate", leaf_key, middle_key, False)
    directory.mkdir(parents=True, exist_ok=True)
    fullchain, key = directory / "fullchain.pem", directory / "key.pem"
    fullchain.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM)
                                   for c in (leaf, middle)))
    key.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return fullchain, key, root.public_bytes(serialization.Encoding.PEM)


class CertificateChainTests(TestCase):
    """A certificate file with intermediates (certbot's fullchain.pem): the server sends the
    whole chain, so a client that trusts only the root verifies it. With only the server's
    own certificate sent (the first of the file), such a client cannot build the chain and
    the handshake fails: a sender that verifies (MTA-STS, DANE-TA, a `verify` policy) could
    not deliver."""

    async def test_the_intermediates_of_the_certificate_file_are_sent(self) -> None:
        clock = Clock()
        db = synchronous_database()
        sink = RecordingSink()
        fullchain, key, root = _chained_pair(Path(self.mktemp()))
        factory = make_factory(await served_domains(db, clock), sink, clock,
                               tls=server_context(fullchain, key))
        server = factory.buildProtocol(None)
        client = LineClient()
        server_transport, client_transport, pump = connect_tls_capable(server, client)

        def say(data: bytes) -> list[str]:
            client_transport.write(data)
            pump.flush()
            return client.take()

        say(b"EHLO client.example\r\nSTARTTLS\r\n")
        client_transport.startTLS(
            ssl.optionsForClientTLS("localhost", trustRoot=ssl.Certificate.loadPEM(root)))
        self.assertEqual(say(b"NOOP\r\n"), ["250 2.0.0 Ok"])
        self.assertFalse(client_transport.disconnecting)
        self.assertTrue(ISSLTransport.providedBy(server_transport))
        say(b"QUIT\r\n")
        server.connectionLost(None)  # type: ignore[arg-type]
