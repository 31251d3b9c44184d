"""Driving the inbound ESMTP server in memory: a recording sink, a served-domain fixture and
a `Session` that feeds raw bytes to the protocol over a StringTransport and reads replies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Gauge
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mailcore.gateway.domains import DomainService
from mailcore.identity import Identity
from mailcore.smtp.envelope import Envelope
from mailcore.smtp.server import ESMTPServerProtocol, SMTPServerFactory
from mailcore.smtp.settings import SMTPSettings
from mailcore.store import Database
from mailcore.workers import CpuPool


@dataclass
class Accepted:
    queue_id: str
    envelope: Envelope
    data: bytes


@dataclass
class RecordingSink:
    """A MessageSink that keeps what it accepts. With `hold`, each accept waits until the
    test fires its Deferred from `pending` (a commit in flight: it lands then even if its
    caller gave up waiting, as the spool's does); with `fail`, accept raises (`fail_with`
    when set, else a RuntimeError)."""

    messages: list[Accepted] = field(default_factory=list)
    hold: bool = False
    fail: bool = False
    fail_with: Exception | None = None
    pending: list[defer.Deferred[None]] = field(default_factory=list)

    async def accept(self, queue_id: str, envelope: Envelope, data: bytes) -> None:
        if self.hold:
            gate: defer.Deferred[None] = defer.Deferred()
            self.pending.append(gate)
            answer: defer.Deferred[None] = defer.Deferred()  # what the caller waits for

            def landed(_: object) -> None:
                try:
                    self._commit(queue_id, envelope, data)
                except Exception:
                    if not answer.called:
                        answer.errback()
                    return
                if not answer.called:
                    answer.callback(None)

            gate.addCallback(landed)
            await answer
            return
        self._commit(queue_id, envelope, data)

    def _commit(self, queue_id: str, envelope: Envelope, data: bytes) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        if self.fail:
            raise RuntimeError("disk full")
        self.messages.append(Accepted(queue_id, envelope, data))

    def release(self) -> None:
        """Let every held accept go on, oldest first."""
        pending, self.pending = self.pending, []
        for gate in pending:
            gate.callback(None)

    @property
    def bodies(self) -> list[bytes]:
        """Accepted data with our Received header (up to its last folded line) removed."""
        return [strip_received(m.data) for m in self.messages]


def strip_received(data: bytes) -> bytes:
    """The message as the client sent it: drop the first header and its folded lines."""
    assert data.startswith(b"Received: "), data[:40]
    pos = data.index(b"\r\n") + 2
    while data[pos:pos + 1] in (b"\t", b" "):
        pos = data.index(b"\r\n", pos) + 2
    return data[pos:]


async def served_domains(db: Database, clock: Clock) -> DomainService:
    """A started DomainService serving example.com (empty list: every local part) and
    listed.example (only john and postmaster)."""
    identity = Identity(db, clock, CpuPool.for_tests())
    owner = (await identity.create_user("owner", "owner@users.test")).id
    domains = DomainService(db, clock, refresh_interval=30)
    await domains.add("example.com", owner, "mx.example.net")
    await domains.add("listed.example", owner, "mx.example.net:2525")
    await domains.add_address("listed.example", "john")
    await domains.add_address("listed.example", "postmaster")
    await domains.refresh()
    return domains


@implementer(ITLSTransport)
class TLSStringTransport(StringTransport):  # type: ignore[misc]
    """A StringTransport that records startTLS instead of doing it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tls_started_with: Any = None
        self.before_tls = b""

    def startTLS(self, contextFactory: Any, normal: bool = True) -> None:
        self.tls_started_with = contextFactory
        self.before_tls = self.value()
        self.clear()


class SendBufferTransport(StringTransport):
    """A StringTransport whose written bytes stay unsent until the client reads them
    (`client_reads`). Like twisted.internet.abstract.FileDescriptor, it pauses its
    streaming producer on a write that leaves more than `buffer_size` octets unsent and
    resumes it once the client has read them all."""

    buffer_size = 64 * 1024

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.producer_paused = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and self.streaming and (
                len(self.io.getvalue()) > self.buffer_size):
            self.producer_paused = True
            self.producer.pauseProducing()

    def client_reads(self) -> bytes:
        """Everything unsent, as the client reads it; then the producer may go on."""
        data = self.value()
        self.clear()
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data


class Session:
    """One in-memory SMTP session: `send(bytes)` returns the reply lines it produced."""

    def __init__(
        self,
        factory: SMTPServerFactory,
        *,
        client_ip: str = "192.0.2.10",
        transport: StringTransport | None = None,
    ) -> None:
        if transport is None:
            transport = StringTransport()
        cls = IPv6Address if ":" in client_ip else IPv4Address
        peer = cls("TCP", client_ip, 40000)
        transport.peerAddr = peer
        self.transport = transport
        self.protocol: ESMTPServerProtocol = factory.buildProtocol(peer)
        self.protocol.makeConnection(transport)
        self.greeting = self.replies()

    def send(self, data: bytes) -> list[str]:
        self.protocol.dataReceived(data)
        return self.replies()

    def replies(self) -> list[str]:
        out = self.transport.value()
        self.transport.clear()
        return out.decode("ascii").split("\r\n")[:-1] if out else []

    def codes(self, data: bytes) -> list[str]:
        """The reply codes (one per complete reply) that sending `data` produced."""
        return [line[:3] for line in self.send(data) if line[3:4] != "-"]

    def hello(self, name: str = "client.example") -> list[str]:
        return self.send(f"EHLO {name}\r\n".encode())

    def close(self) -> None:
        if not self.transport.disconnected:
            self.protocol.connectionLost(Exception("test over"))  # type: ignore[arg-type]
            self.transport.disconnected = True

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting)


def make_factory(
    domains: DomainService,
    sink: RecordingSink | None,
    clock: Clock,
    *,
    tls: Any = None,
    stress_gauge: Gauge | None = None,
    **limits: Any,
) -> SMTPServerFactory:
    settings = SMTPSettings(hostname="mx.gateway.test", **limits)
    return SMTPServerFactory(settings, domains, sink, clock, tls=tls, stress_gauge=stress_gauge)
