"""Real TLS (OpenSSL memory BIOs) over iosim's in-memory transports, with STARTTLS.

iosim's own `startTLS` only pretends. `TLSFakeTransport.startTLS` inserts a real
`TLSMemoryBIOProtocol` the way Twisted's TCP transports do (`twisted.internet._newtls`), so
a STARTTLS test runs the real handshake, certificate checks included, with no sockets and
no reactor: `pump.flush()` moves the bytes. (The plain, non-buffering TLS protocol is used:
the buffering one would flush small writes on the global reactor's next iteration.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet._newtls import _BypassTLS
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IProtocol, ISSLTransport, ITLSTransport
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.test.iosim import FakeTransport, IOPump, connect
from zope.interface import alsoProvides, implementer


@implementer(ITLSTransport)
class TLSFakeTransport(FakeTransport):
    """An iosim transport whose startTLS is real."""

    TLS = False

    def __init__(self, protocol: IProtocol, isServer: bool, **kwargs: Any) -> None:
        super().__init__(protocol, isServer, **kwargs)
        self._tlsClientDefault = not isServer

    def startTLS(self, contextFactory: Any, beNormal: bool = True) -> None:
        client = self._tlsClientDefault if beNormal else not self._tlsClientDefault
        factory = TLSMemoryBIOFactory(
            contextFactory, client, None, clock=Clock()  # type: ignore[arg-type]
        )
        tls = TLSMemoryBIOProtocol(factory, self.protocol, False)
        self.protocol = tls
        self.getHandle = tls.getHandle
        self.getPeerCertificate = tls.getPeerCertificate
        alsoProvides(self, ISSLTransport)
        self.TLS = True
        tls.makeConnection(_BypassTLS(FakeTransport, self))

    def write(self, data: bytes) -> None:
        if self.TLS:
            if not self.disconnecting:
                self.protocol.write(data)
        else:
            FakeTransport.write(self, data)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))

    def loseConnection(self) -> None:
        if self.TLS and not self.disconnecting:
            self.protocol.loseConnection()
        else:
            FakeTransport.loseConnection(self)


def connect_tls_capable(
    server: IProtocol,
    client: IProtocol,
    *,
    client_ip: str = "192.0.2.10",
) -> tuple[TLSFakeTransport, TLSFakeTransport, IOPump]:
    """Connect two protocols in memory over STARTTLS-capable transports; returns the
    server transport, the client transport and the pump (already flushed once)."""
    server_address = IPv4Address("TCP", "192.0.2.1", 25)
    client_address = IPv4Address("TCP", client_ip, 40000)
    server_transport = TLSFakeTransport(
        server, True, hostAddress=server_address, peerAddress=client_address
    )
    client_transport = TLSFakeTransport(
        client, False, hostAddress=client_address, peerAddress=server_address
    )
    pump = connect(server, server_transport, client, client_transport, greet=True)
    return server_transport, client_transport, pump
