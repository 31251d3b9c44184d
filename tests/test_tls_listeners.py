"""`ssl:` listeners (SMTPS, HTTPS) over real 127.0.0.1 sockets: the whole chain of their
certificate file is sent, and a renewed pair is served to new connections after the
reloader's next check, without a restart."""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from OpenSSL import SSL, crypto
from twisted.application.service import MultiService
from twisted.internet import threads
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.test.proto_helpers import MemoryReactorClock
from twisted.trial.unittest import TestCase

from mailcore.config import Config, ConfigError
from mailcore.core import Core
from mailcore.queue.nexthop import ListeningEndpoint
from mailcore.startup import check_listeners
from mailcore.tls import RELOAD_CHECK_INTERVAL
from mailcore.tlslisten import TLSListeners, TLSServerEndpoint, parse_ssl
from mailcore.workers import CpuPool
from tests.support.db import synchronous_database
from tests.support.reactor import get_reactor
from tests.support.testca import make_pki, shared_pki

T = TypeVar("T")


class _Hello(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hello\r\n")  # type: ignore[union-attr]


def handshake(port: int) -> list[bytes]:
    """The certificates (DER) a TLS server on 127.0.0.1:`port` sends, its own first; its
    first line read too. Blocks."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        connection = SSL.Connection(context, raw)
        connection.set_connect_state()
        connection.set_tlsext_host_name(b"localhost")
        _blocking(raw, connection.do_handshake)
        assert _blocking(raw, lambda: connection.recv(100)) == b"hello\r\n"
        chain = connection.get_peer_cert_chain() or []
        return [crypto.dump_certificate(crypto.FILETYPE_ASN1, c) for c in chain]


def _blocking(raw: socket.socket, call: Callable[[], T]) -> T:
    """`call` on a socket with a timeout (pyOpenSSL sees it as non-blocking), waiting (5 s
    at most each time) for the socket to be readable as long as it wants to read."""
    for _ in range(50):
        try:
            return call()
        except SSL.WantReadError:
            if not select.select([raw], [], [], 5)[0]:
                break
    raise TimeoutError("no TLS answer")


def der(pem: bytes) -> bytes:
    return crypto.dump_certificate(
        crypto.FILETYPE_ASN1, crypto.load_certificate(crypto.FILETYPE_PEM, pem))


class SSLListenerTests(TestCase):
    def setUp(self) -> None:
        self.reactor = get_reactor()
        self.clock = Clock()
        self.listeners = TLSListeners(self.clock, CpuPool.for_tests())
        self.dir = Path(self.mktemp())
        self.old, self.new = shared_pki(), make_pki("Renewed CA")
        self.cert, self.key = self.old.write_server_pair(self.dir)
        # certbot's fullchain.pem: the certificate, then its issuer.
        self.cert.write_bytes(self.old.cert_pem + self.old.ca_pem)

    async def listen(self, description: str) -> int:
        endpoint = self.listeners.endpoint(self.reactor, description)
        factory = Factory.forProtocol(_Hello)
        port = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        for reloader in self.listeners.services():
            reloader.startService()
            self.addCleanup(reloader.stopService)
        return port.getHost().port  # type: ignore[attr-defined,no-any-return]

    async def test_the_full_chain_is_sent_and_a_renewed_pair_served(self) -> None:
        port = await self.listen(
            f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}")
        chain = await threads.deferToThread(handshake, port)
        self.assertEqual(chain, [der(self.old.cert_pem), der(self.old.ca_pem)])

        # Renewed in place (the key first, as certbot's new archive files are linked).
        self.key.write_bytes(self.new.key_pem)
        self.cert.write_bytes(self.new.cert_pem + self.new.ca_pem)
        for path in (self.key, self.cert):
            os.utime(path, ns=(10**18, 10**18))
        self.assertEqual((await threads.deferToThread(handshake, port))[0],
                         der(self.old.cert_pem))  # until the check
        self.clock.advance(RELOAD_CHECK_INTERVAL)
        chain = await threads.deferToThread(handshake, port)
        self.assertEqual(chain, [der(self.new.cert_pem), der(self.new.ca_pem)])

    async def test_extra_cert_chain_is_sent_after_the_certificate(self) -> None:
        self.cert.write_bytes(self.old.cert_pem)
        chain_file = self.dir / "chain.pem"
        chain_file.write_bytes(self.old.ca_pem)
        port = await self.listen(
            f"ssl:0:interface=127.0.0.1:privateKey={self.key}:certKey={self.cert}"
            f":extraCertChain={chain_file}")
        chain = await threads.deferToThread(handshake, port)
        self.assertEqual(chain, [der(self.old.cert_pem), der(self.old.ca_pem)])


class ParseTests(TestCase):
    def test_twisted_syntax_and_defaults(self) -> None:
        listener = parse_ssl(r"ssl:port=465:privateKey=/k\:ey.pem:interface=\:\:1")
        assert listener is not None
        self.assertEqual((listener.port, listener.interface, listener.backlog),
                         (465, "::1", 50))
        self.assertEqual((listener.cert, listener.key, listener.chain),
                         (Path("/k:ey.pem"), Path("/k:ey.pem"), None))
        self.assertIsNone(parse_ssl("tcp:25"))

    def test_parameters_that_would_change_the_protocol_floor_are_refused(self) -> None:
        cert, key = shared_pki().write_server_pair(Path(self.mktemp()))
        base = f"ssl:465:privateKey={key}:certKey={cert}"
        check_listeners(Config(http_endpoints=(f"{base}:sslmethod=TLS_METHOD",)),
                        MemoryReactorClock())
        for extra, message in [
            (":sslmethod=TLSv1_METHOD", "sslmethod=TLSv1_METHOD is not supported"),
            (":dhParameters=/dh.pem", "dhParameters= is not supported"),
            (":backlog=many", "'many' is not a number"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                check_listeners(Config(smtp_endpoints=(base + extra,)), MemoryReactorClock())
            self.assertIn(message, str(caught.exception))
        key.write_bytes(make_pki("Other CA").key_pem)  # not the certificate's key
        with self.assertRaises(ConfigError) as caught:
            check_listeners(Config(smtp_endpoints=(base,)), MemoryReactorClock())
        self.assertIn("its certificate or key does not load", str(caught.exception))


class DaemonWiringTests(TestCase):
    def test_smtp_listeners_share_the_starttls_reloader_when_the_files_are_its(self) -> None:
        reactor = MemoryReactorClock()
        cert, key = shared_pki().write_server_pair(Path(self.mktemp()))
        other = Path(self.mktemp())
        other_cert, other_key = make_pki("Other CA").write_server_pair(other)
        config = Config(smtp_endpoints=(
            "tcp:2525", f"ssl:465:privateKey={key}:certKey={cert}",
            f"ssl:4650:privateKey={other_key}:certKey={other_cert}",
            f"ssl:4651:privateKey={other_key}:certKey={other_cert}"))
        core = Core.build(config, synchronous_database(), reactor, tls_cert=cert, tls_key=key,
                          cpu=CpuPool.for_tests())
        services: list[Any] = core.listener_services(reactor)
        endpoints = [svc.endpoint for svc in services]
        self.assertTrue(all(isinstance(e, ListeningEndpoint) for e in endpoints))
        inner = [e.endpoint for e in endpoints]
        self.assertNotIsInstance(inner[0], TLSServerEndpoint)
        self.assertIs(inner[1].reloader, core.certificate)
        self.assertIs(inner[2].reloader, inner[3].reloader)
        self.assertEqual(core.tls_listeners.services(), [inner[2].reloader])
        top = MultiService()  # as the daemon starts them (names must differ)
        for svc in [*core.background_services(), *core.tls_listeners.services()]:
            svc.setServiceParent(top)
