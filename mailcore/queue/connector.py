"""Opening SMTP sessions to next hops over TCP, and the TLS options for STARTTLS.

Opportunistic TLS ('may') encrypts without checking the certificate, as Postfix's `may`
level does; 'verify' and 'verify-if-offered' (the default, when the hop offers STARTTLS)
check the chain and the host name with `optionsForClientTLS(hostname, trustRoot=…)`,
trusting `tls_ca_file` when configured (a private CA) and the platform's roots otherwise.
Which policy a hop gets is the router's business (`Hop.tls`); the runner's `_open` applies it.

Which addresses a hop may have is `mailcore.queue.nexthop`'s: an IP-literal hop is checked
(cached) before connecting, a host name is resolved and only the addresses the policy
allows are tried, at most MAX_ADDRESSES of them (netpolicy's `GuardedEndpoint`), and a
connection that reached one of our own listeners is closed before any SMTP is spoken. A
refusal is a `NextHopRefused`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

from mailcore.netpolicy import AddressRefused, GuardedEndpoint
from mailcore.queue.nexthop import NextHopPolicy, Verdict
from mailcore.queue.routing import Hop
from mailcore.queue.runner import Connector
from mailcore.queue.settings import QueueSettings
from mailcore.smtp.client import SMTPClientProtocol, SMTPSession, client_factory
from mailcore.tls import TLS_FLOOR, trust_roots, verifying_options

# The addresses of one next-hop name tried at most (each may take `connect_timeout`): a
# name with a hundred unanswering addresses held a connection attempt for 50 minutes.
MAX_ADDRESSES = 5


class TCPConnector(Connector):
    """Real connections through the reactor, only to addresses `policy` allows (IP
    literals skip name resolution)."""

    def __init__(self, reactor: Any, settings: QueueSettings, helo_name: str,
                 policy: NextHopPolicy | None = None) -> None:
        self.reactor = reactor
        self.settings = settings
        self.helo_name = helo_name
        self.policy = policy if policy is not None else NextHopPolicy(settings)
        self._trust: Any = None

    def endpoint(self, hop: Hop) -> IStreamClientEndpoint:
        """The endpoint to reach `hop`; NextHopRefused when its address is refused."""
        timeout = self.settings.connect_timeout
        literal = isIPAddress(hop.host) or isIPv6Address(hop.host)
        if literal:
            verdict = self.policy.verdict(hop.host, hop.port)
            if verdict is not None:
                raise self.policy.refused(hop.host, hop.port, {hop.host: verdict})
            if isIPAddress(hop.host):
                return TCP4ClientEndpoint(self.reactor, hop.host, hop.port, timeout=timeout)
            return TCP6ClientEndpoint(self.reactor, hop.host, hop.port, timeout=timeout)
        host = hop.host.encode("idna").decode("ascii")
        return GuardedEndpoint(self.reactor, self.policy.at_port(hop.port), host, hop.port,
                               timeout, max_addresses=MAX_ADDRESSES)

    def connect(self, hop: Hop) -> defer.Deferred[SMTPSession]:
        return defer.Deferred.fromCoroutine(self._connect(hop))

    async def _connect(self, hop: Hop) -> SMTPSession:
        factory = client_factory(self.reactor, self.settings.command_timeout)
        try:
            protocol = await self.endpoint(hop).connect(factory)
        except AddressRefused as e:
            if not e.reasons:  # the name did not resolve: a network failure, retried
                raise
            verdicts = {a: self.policy.verdict(a, hop.port) or Verdict(r)
                        for a, r in e.reasons.items()}
            raise self.policy.refused(hop.host, hop.port, verdicts) from None
        assert isinstance(protocol, SMTPClientProtocol)
        looped = self.policy.check_connected(hop.host, hop.port, protocol.transport)
        if looped is not None:
            protocol.transport.abortConnection()  # type: ignore[union-attr]
            raise looped
        session = SMTPSession(
            protocol, helo_name=self.helo_name, data_timeout=self.settings.data_timeout
        )
        try:
            await session.handshake()
        except BaseException:
            session.abort()
            raise
        return session

    def check_peer(self, session: SMTPSession, hop: Hop) -> None:
        """Check the host name (or address) once more on the finished handshake.

        `optionsForClientTLS` already verifies it during the handshake, but an exception
        other than VerificationError there (a certificate with a malformed name) is only
        logged and the connection goes on; this makes any such doubt a failure.
        """
        from service_identity.pyopenssl import verify_hostname, verify_ip_address

        transport: Any = session.protocol.transport
        connection = transport.getHandle()
        if isIPAddress(hop.host) or isIPv6Address(hop.host):
            verify_ip_address(connection, hop.host)
        else:
            verify_hostname(connection, hop.host)

    def tls_creator(self, hop: Hop, verify: bool) -> Any:
        if not verify:
            return ssl.CertificateOptions(raiseMinimumTo=TLS_FLOOR)
        if self._trust is None:
            self._trust = trust_roots(self.settings.tls_ca_file)
        return verifying_options(hop.host, self._trust)
