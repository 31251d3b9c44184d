"""The oldest TLS version we speak is 1.2, as a server (STARTTLS, TLS listeners) and as the
verifying SMTP client, whatever the distribution's OpenSSL configuration allows.

Each handshake runs in memory between two pyOpenSSL connections. The peer, and for the
test our side too, run at OpenSSL security level 0, as a distribution configuration that
still allows TLS 1.0 and 1.1 would: only our own version floor can then refuse TLS 1.1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial.unittest import TestCase

from mailcore.queue.connector import TCPConnector
from mailcore.queue.routing import Hop
from mailcore.queue.settings import QueueSettings
from mailcore.tls import server_context
from tests.support.testca import shared_pki

PERMISSIVE = b"DEFAULT:@SECLEVEL=0"


def handshake(client: SSL.Connection, server: SSL.Connection) -> str:
    """Run a handshake to its end; the version agreed, or SSL.Error."""
    client.set_connect_state()
    server.set_accept_state()
    for _ in range(20):
        moved = False
        for side, other in ((client, server), (server, client)):
            try:
                side.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                other.bio_write(side.bio_read(65536))
                moved = True
            except SSL.WantReadError:
                pass
        if not moved:
            break
    return str(client.get_protocol_version_name())


def peer_context(version: int) -> SSL.Context:
    """A legacy peer that speaks only `version`."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_cipher_list(PERMISSIVE)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    return context


class ServerTests(TestCase):
    def context(self) -> SSL.Context:
        cert, key = shared_pki().write_server_pair(Path(self.mktemp()))
        context = server_context(cert, key).getContext()
        context.set_cipher_list(PERMISSIVE)
        return context

    def test_a_tls_1_1_client_is_refused(self) -> None:
        client = SSL.Connection(peer_context(SSL.TLS1_1_VERSION), None)
        server = SSL.Connection(self.context(), None)
        e = self.assertRaises(SSL.Error, handshake, client, server)
        self.assertIn("protocol", str(e))

    def test_a_tls_1_2_client_is_served(self) -> None:
        client = SSL.Connection(peer_context(SSL.TLS1_2_VERSION), None)
        server = SSL.Connection(self.context(), None)
        self.assertEqual(handshake(client, server), "TLSv1.2")


class SmtpClientTests(TestCase):
    def client(self, verify: bool) -> TLSMemoryBIOProtocol:
        """The queue's TLS client side for a hop, as it connects (ClientHello written)."""
        pki = shared_pki()
        ca = Path(self.mktemp())
        ca.write_bytes(pki.ca_pem)
        connector = TCPConnector(None, QueueSettings(tls_ca_file=str(ca)), "mx.example.test")
        creator = connector.tls_creator(Hop("localhost", 25, "verify"), verify)
        # Our context as permissive as a legacy distribution's (set before it makes a
        # connection, after which OpenSSL contexts are frozen). Twisted's ClientTLSOptions
        # keeps its CertificateOptions only as the owner of a private bound method.
        options = creator._createConnection.__self__ if verify else creator
        options.getContext().set_cipher_list(PERMISSIVE)
        factory = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol))
        protocol = factory.buildProtocol(None)
        assert isinstance(protocol, TLSMemoryBIOProtocol)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol

    def exchange(self, client: TLSMemoryBIOProtocol, server: SSL.Connection) -> str:
        """Pump the handshake; the version agreed, or SSL.Error (the server's side)."""
        server.set_accept_state()
        transport: Any = client.transport
        for _ in range(10):
            sent = transport.value()
            transport.clear()
            if sent:
                server.bio_write(sent)
            try:
                server.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                client.dataReceived(server.bio_read(65536))
            except SSL.WantReadError:
                if not sent:
                    break
        return str(server.get_protocol_version_name())

    def legacy_server(self, version: int) -> SSL.Connection:
        pki = shared_pki()
        cert, key = pki.write_server_pair(Path(self.mktemp()))
        context = peer_context(version)
        context.use_certificate_chain_file(str(cert))
        context.use_privatekey_file(str(key))
        return SSL.Connection(context, None)

    def test_a_tls_1_1_server_is_refused_verified_or_not(self) -> None:
        for verify in (True, False):
            client = self.client(verify)
            e = self.assertRaises(SSL.Error, self.exchange, client,
                                  self.legacy_server(SSL.TLS1_1_VERSION))
            self.assertIn("protocol", str(e))
            self.assertFalse(client._handshakeDone)

    def test_a_tls_1_2_server_is_spoken_to(self) -> None:
        for verify in (True, False):
            client = self.client(verify)
            self.assertEqual(self.exchange(client, self.legacy_server(SSL.TLS1_2_VERSION)),
                             "TLSv1.2")
            self.assertTrue(client._handshakeDone)
